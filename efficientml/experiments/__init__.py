"""Experiments the CLI can run without a notebook: ``python -m efficientml run NAME``.

``core`` holds the registry, ``run``/``run_experiment`` and what every chapter shares; one module
per chapter holds its experiments: ``learning_rates`` (1), ``quantization`` (2), ``pruning`` (3),
``transfer`` (4), ``transformer`` (5), ``language_model`` (6). Importing this package registers
them all.
"""
from .core import (EXPERIMENTS, Experiment, class_split, per_seed, register, run, run_experiment, seed_for, settings,
                   train_loaders, validation_split)
from .learning_rates import CONVNET_FULL, CONVNET_QUICK, convnet_size, train_convnet
from .quantization import (MLP_FULL, MLP_QUICK, bits_table, change_spread, plot_sweep, quantization_over_seeds,
                           quantization_sweep, reference_table, sweep_spread, sweep_table, train_mlp)
from .pruning import PRUNING_FULL, PRUNING_QUICK, train_pruning_runs
from .transfer import (LORA_FULL, LORA_QUICK, TRANSFER_RUNS, pretrained_backbone, rank_label, sweep_ranks, train_transfer_runs,
                       transfer_model)
from .transformer import TRANSFORMER_FULL, TRANSFORMER_QUICK, sequence_accuracy, train_sequence_transformer
from .language_model import (LM_FULL, LM_QUICK, finetune_language_model, finetune_model, finetune_runs,
                             language_model_data, new_text_split, train_language_model)
