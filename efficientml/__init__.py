"""efficientml: the companion package of the EfficientML Book.

One obvious home for each idea: ``data`` (data sets and the tensor-resident loader), ``train``
(``fit``, the one training engine), ``models``, ``quantization``, ``pruning``, ``lora``,
``transformer``, ``ngram`` (a language model's baselines), ``cost`` (timing, the roofline,
utilization, precision: Chapter 7), ``nanogpt`` (its yardstick), ``parallel`` (memory of a step, checkpointing,
accumulation, data parallelism, sharded optimizer state: Chapter 8), ``serving`` (tiled attention,
the KV cache's bytes, speculative decoding: the serving chapter's engine, chapter not yet written),
``plots``, ``reproducibility``,
``profiles`` and ``results`` (quick/full profiles, JSON results with provenance),
``experiments`` (what the CLI runs).
"""
from . import reproducibility  # first: a forced CPU kernel path gets its own compile cache
from .data import DataMissingError, ImageDataset, TensorLoader, data_root, load_dataset
from .models import MLP, ConvNet, count_macs, count_parameters
from .plots import markdown_table, moving_average, plot_accuracy, plot_history, plot_loss, plot_lr, seconds
from .profiles import get_profile
from .reproducibility import apply_threads, seed_everything
from .train import History, evaluate, fit, select_device

__version__ = "0.1.0"

apply_threads()  # $EFFICIENTML_THREADS, when the reader (or CI) sets it; otherwise torch's count stays
