"""Training past one device (Chapter 8): what a training step holds in memory, activation
checkpointing, gradient accumulation, data parallelism and sharded optimizer state.

- **Memory of a step**: ``model_state_bytes`` (parameters, gradients, optimizer state: the
  formula), ``layer_activation_bytes`` and ``activation_bytes`` (what autograd saves in the
  forward pass of Chapter 6's language model, counted tensor by tensor), ``StepMemory`` and
  ``step_memory`` (all of it measured), ``saved_tensors`` (the list), ``language_model_parameters``,
  ``check_layer_activation_bytes`` (the chapter's exercise).
- **Recomputation**: ``Checkpointed`` wraps a block so that ``torch.utils.checkpoint`` keeps only
  its input and recomputes the rest in the backward pass; ``checkpoint_blocks``.
- **Accumulation**: ``accumulate_gradients``: k micro-batches, one update.
- **Processes**: ``launch`` runs a function in ``world_size`` processes joined by
  ``torch.distributed`` (gloo on localhost; NCCL where the workers use CUDA), always ended:
  timeouts, ``destroy_process_group``, no process left behind when one fails, a port in use
  handled.
- **Data parallelism**: ``allreduce_gradients`` (the minimal version, on the page),
  ``train_data_parallel`` (one training run: one process, the minimal all-reduce, PyTorch's
  ``DistributedDataParallel``, DDP with ``ZeroRedundancyOptimizer``, or FSDP2's
  ``fully_shard``), ``allreduce_times``.
"""
from __future__ import annotations

import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora import cpu_memory_levels, gradient_bytes, optimizer_state_bytes, peak_memory_bytes, saved_activation_bytes


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


# -- 8.1 The memory of a training step --------------------------------------------------------

def language_model_parameters(vocab: int, d_model: int, n_layers: int, d_ff: int) -> int:
    """Parameters of Chapter 6's ``LanguageModel``: the embedding (V d), per layer four d x d
    projections with biases, the feed-forward's two matrices with biases and two LayerNorms
    (gain and shift), a final LayerNorm and the output layer (d V + V)."""
    d, f = d_model, d_ff
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    return vocab * d + n_layers * per_layer + 2 * d + d * vocab + vocab


# bytes per parameter of each training state; "mixed": bfloat16 weights and gradients for the
# arithmetic, with a float32 master copy and float32 Adam moments (the usual large-model recipe)
STATE_BYTES = {"float32": {"parameters": 4, "gradients": 4, "optimizer": 8},
               "mixed": {"parameters": 2, "gradients": 2, "optimizer": 12}}


def model_state_bytes(n_params: int, recipe: str = "float32", shards: int = 1, zero_stage: int = 0) -> dict[str, float]:
    """Bytes per process of the parameters, gradients and AdamW state (two moments per
    parameter) of an ``n_params`` model trained on ``shards`` processes with ZeRO stage 0
    (nothing sharded: plain data parallelism), 1 (optimizer state sharded), 2 (and gradients) or
    3 (and parameters). ``recipe``: "float32" (4 + 4 + 8 bytes per parameter) or "mixed"
    (bfloat16 parameters and gradients, float32 master weights and moments: 2 + 2 + 12).
    Activations are not included: they depend on the batch, not on the parameters."""
    if recipe not in STATE_BYTES:
        raise ValueError(f"recipe must be one of {sorted(STATE_BYTES)}, got {recipe!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    _positive_int(shards, "shards")
    b = STATE_BYTES[recipe]
    split = {"optimizer": zero_stage >= 1, "gradients": zero_stage >= 2, "parameters": zero_stage >= 3}
    return {k: n_params * b[k] / (shards if split[k] else 1) for k in ("parameters", "gradients", "optimizer")}


def layer_activation_bytes(batch: int, seq: int, d_model: int, n_heads: int, d_ff: int) -> int:
    """Bytes autograd saves in the forward pass of one block of Chapter 6's language model
    (pre-norm ``EncoderLayer`` under a causal mask, float32, no dropout), for a batch of
    ``batch`` sequences of ``seq`` tokens. Counted tensor by tensor (B batch, T seq, d d_model,
    h heads, f d_ff; float32 entries are 4 bytes):

    - first LayerNorm: its input (B T d) and per position a mean and a 1/std (2 B T);
    - the q, k, v projections: their one shared input, the normalised x (B T d);
    - q k^T: q and k (2 B T d); the causal mask, inverted for ``masked_fill`` (T^2 bools);
    - softmax: its output, the weights (h B T^2), which weights @ v also uses with v (B T d);
    - the output projection: its input, the heads concatenated (B T d);
    - second LayerNorm (B T d + 2 B T), the first feed-forward layer's input (B T d), and ReLU's
      output, which is also the second layer's input (B T f).
    """
    b, t, d, h, f = batch, seq, d_model, n_heads, d_ff
    return 4 * (8 * b * t * d + 4 * b * t + b * t * f + h * b * t * t) + t * t


def activation_bytes(batch: int, seq: int, d_model: int, n_heads: int, d_ff: int, n_layers: int) -> int:
    """Bytes autograd saves in one forward pass of Chapter 6's ``LanguageModel``: every block
    (``layer_activation_bytes``), the token ids for the embedding's backward (int64, 8 B T), the
    final LayerNorm (B T d + 2 B T floats) and the output layer's input (B T d floats)."""
    b, t, d = batch, seq, d_model
    return (n_layers * layer_activation_bytes(b, t, d, n_heads, d_ff) + 8 * b * t
            + 4 * (2 * b * t * d + 2 * b * t))


def saved_tensors(model: nn.Module, *inputs: torch.Tensor, within: nn.Module | None = None) -> list[tuple]:
    """What autograd saves for the backward pass in one forward call ``model(*inputs)``, tensor
    by tensor, in the order saved: ``[(shape, dtype, bytes), ...]``, each storage once and not
    the model's own weights (as ``lora.saved_activation_bytes`` counts them, whose total this
    is). ``within``: a submodule (one block); only what is saved while it runs is listed."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    inside = [within is None]
    seen: dict[int, tuple] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if inside[0] and st.data_ptr() not in own and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (tuple(t.shape), t.dtype, st.nbytes())
        return t

    hooks = []
    if within is not None:
        hooks = [within.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
                 within.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
        del out
    finally:
        for h in hooks:
            h.remove()
    return list(seen.values())


def check_layer_activation_bytes(fn: Callable[..., int]) -> None:
    """Chapter 8's exercise: check a reader's ``fn(batch, seq, d_model, n_heads, d_ff)``, the
    bytes autograd saves in one block of Chapter 6's language model, against a measurement:
    what a model of two blocks saves minus what the same model of one block saves
    (``lora.saved_activation_bytes``), on several shapes. Raises AssertionError naming the first
    shape where they differ and by how much; prints what passed."""
    from .transformer import LanguageModel
    shapes = [(2, 8, 16, 2, 32), (3, 16, 16, 4, 64), (4, 5, 24, 3, 40), (1, 32, 8, 1, 8)]
    for b, t, d, h, f in shapes:
        x = torch.zeros(b, t, dtype=torch.long)
        measured = []
        for n in (1, 2):
            torch.manual_seed(0)
            measured.append(saved_activation_bytes(LanguageModel(11, d, h, n, f, 0.0, max_len=t), x))
        want = measured[1] - measured[0]
        got = fn(b, t, d, h, f)
        call = f"layer_activation_bytes(batch={b}, seq={t}, d_model={d}, n_heads={h}, d_ff={f})"
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            raise AssertionError(f"{call} returned {type(got).__name__}, not a number of bytes")
        if got != want:
            raise AssertionError(f"{call} = {got}, measured {want} bytes ({want - got:+} missing)")
    print(f"layer_activation_bytes equals the measured bytes of a block on all {len(shapes)} shapes")


@dataclass
class StepMemory:
    """Bytes of one training step, measured. ``parameters``, ``gradients``, ``optimizer_state``:
    the tensors themselves; ``activations``: what autograd saved in the forward pass
    (``lora.saved_activation_bytes``); ``held_after_forward``: what the forward pass left
    allocated (saved tensors, the logits, the loss); ``peak``: the most allocated at once during
    the step (forward, backward, optimizer) above what was allocated before it (the weights and
    optimizer state, gradients freed), from the profiler (``lora.peak_memory_bytes``)."""
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    held_after_forward: int
    peak: int

    def to_dict(self) -> dict:
        return asdict(self)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy (nats) of ``model``'s next-token logits (B, T, V) for tokens
    ``x`` (B, T) against targets ``y`` (B, T)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepMemory:
    """Measure ``StepMemory`` of one step of ``model`` on (x, y) with ``optimizer``, on the CPU.
    Takes two steps (the first creates the optimizer's state), so it changes the model."""
    for p in model.parameters():
        if p.device.type != "cpu":
            raise ValueError(f"step_memory measures on the CPU; the model is on {p.device}")

    def step():
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, x, y).backward()
        optimizer.step()
    step()                                             # the optimizer's state now exists
    grads = gradient_bytes(model)
    optimizer.zero_grad(set_to_none=True)
    held = forward_held_bytes(model, x, y)          # leaves no attention weights kept
    peak = peak_memory_bytes(step)
    return StepMemory(sum(p.numel() * p.element_size() for p in model.parameters()), grads,
                      optimizer_state_bytes(optimizer), saved_activation_bytes(model, x), held, peak)


def drop_kept_weights(model: nn.Module) -> None:
    """Forget the attention weights each ``MultiHeadAttention`` keeps from its last call (for
    Chapter 5's plots): not training memory, and a measurement that starts with them alive
    counts their release when the next call replaces them. Call it before measuring memory."""
    for m in model.modules():
        if isinstance(getattr(m, "weights", None), torch.Tensor):
            m.weights = None


def forward_held_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes a training forward pass (model and loss) leaves allocated on the CPU until its
    backward pass: the tensors autograd saved, the logits and the loss; not the attention
    weights ``MultiHeadAttention`` keeps for Chapter 5's plots (released before the level is
    read; they are also saved by autograd unless the blocks are checkpointed). The profiler's
    running sum (``cpu_memory_levels``) at the end of the forward pass; the graph is then freed."""
    drop_kept_weights(model)
    kept = []

    def forward():
        kept.append(lm_loss(model, x, y))
        drop_kept_weights(model)
    held = cpu_memory_levels(forward)[1]
    kept.clear()
    return held


# -- 8.2 Activation checkpointing -------------------------------------------------------------

class Checkpointed(nn.Module):
    """``block`` whose activations are not kept: in training, its forward pass runs under
    ``torch.utils.checkpoint`` (non-reentrant), which keeps only the block's inputs and
    recomputes its forward pass during the backward pass to get the saved tensors back. The
    block's outputs and gradients are those of ``block`` itself; the price is one more forward
    pass of the block per step. In ``eval`` mode, or without gradients, it is ``block``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False, **kwargs)
        return self.block(*args, **kwargs)


def checkpoint_blocks(model: nn.Module, name: str = "layers") -> nn.Module:
    """Wrap every block of ``model``'s ``nn.ModuleList`` attribute ``name`` (Chapter 6's
    ``LanguageModel.layers``) in ``Checkpointed``, in place; returns the model. Parameters are
    the same tensors, so an optimizer built before still updates them."""
    blocks = getattr(model, name, None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"model.{name} must be an nn.ModuleList of blocks, got {type(blocks).__name__}")
    for i, block in enumerate(blocks):
        if not isinstance(block, Checkpointed):
            blocks[i] = Checkpointed(block)
    return model


# -- 8.3 Gradient accumulation ----------------------------------------------------------------

def accumulate_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batches: int) -> float:
    """Gradients of the mean cross-entropy over the whole batch (x, y), computed in
    ``micro_batches`` equal parts, one forward and backward pass each: each part's mean loss is
    divided by the number of parts, and ``backward`` adds the parts' gradients into ``.grad``.
    Only one part's activations are alive at a time. Sets the gradients (old ones are
    discarded); returns the batch's mean loss."""
    k = _positive_int(micro_batches, "micro_batches")
    if x.shape[0] % k:
        raise ValueError(f"micro_batches={k} must divide the batch of {x.shape[0]}")
    for p in model.parameters():
        p.grad = None
    total = 0.0
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        loss = lm_loss(model, xs, ys) / k
        loss.backward()
        total += loss.item()
    return total


# -- 8.4 Processes joined by torch.distributed ------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str, threads: int,
           timeout: float, backend: str) -> None:
    """What each process runs: join the group, call ``fn(rank, world_size, *args)``, store its
    result in ``out_dir``, leave the group (also when ``fn`` raises)."""
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class LaunchError(RuntimeError):
    """A process started by ``launch`` failed; the message holds its traceback."""


def launch(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 300.0, threads: int | None = None,
           port: int | None = None, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in one
    ``torch.distributed`` process group on this machine only (127.0.0.1), and return their
    results, ``[result of rank 0, result of rank 1, ...]`` (loaded on the CPU).

    ``fn`` must be importable (a module's top-level function: the processes are spawned, not
    forked, as CUDA and Jupyter need). ``threads``: per process (default: this process's
    threads divided among them, at least 1). ``port``: the rendezvous port (default: a free one;
    if another program takes it before the processes bind it, they are started again on another,
    up to 3 times); a port given that is in use raises ``ValueError``. ``backend``: "gloo" (CPU)
    or "nccl" (CUDA). Everything ends: after ``timeout`` seconds the processes are killed and
    ``TimeoutError`` is raised; if one raises, the others are stopped and ``LaunchError`` carries
    its traceback; each process leaves the group (``destroy_process_group``) however ``fn`` ends.
    """
    world_size = _positive_int(world_size, "world_size")
    if not callable(fn):
        raise TypeError(f"fn must be a function, got {type(fn).__name__}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not (timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if port is not None and port_in_use(port):
        raise ValueError(f"port {port} on 127.0.0.1 is in use; pass another, or none to get a free one")
    threads = threads or max(1, torch.get_num_threads() // world_size)
    for attempt in range(3):
        chosen = port if port is not None else free_port()
        try:
            return _launch_once(fn, world_size, args, timeout, threads, chosen, backend)
        except LaunchError as e:
            if port is None and "address already in use" in str(e).lower() and attempt < 2:
                continue
            raise
    raise AssertionError("unreachable")


def _launch_once(fn, world_size, args, timeout, threads, port, backend) -> list:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="efficientml-launch-") as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, port, fn, tuple(args), out_dir, threads, timeout, backend),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the {world_size} processes did not finish within {timeout} s; "
                                       "they were stopped")
        except mp.ProcessRaisedException as e:
            raise LaunchError(f"a process failed:\n{e}") from None
        except mp.ProcessExitedException as e:
            raise LaunchError(f"a process ended without finishing (exit code {e.exit_code})") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", map_location="cpu", weights_only=True)
                for r in range(world_size)]


def allreduce_gradients(model: nn.Module) -> None:
    """Data parallelism's one extra step, minimally: after ``backward``, replace every gradient
    by its mean over all processes (each process computed it on its own part of the batch), so
    that every process takes the same optimizer step. One ``all_reduce`` per tensor: PyTorch's
    ``DistributedDataParallel`` does the same sum in buckets of many tensors, started while the
    backward pass is still running."""
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


MODES = ("single", "allreduce", "ddp", "zero", "fsdp")


def _language_model(s: dict, vocab: int) -> nn.Module:
    from .transformer import LanguageModel
    return LanguageModel(vocab, s["d_model"], s["n_heads"], s["n_layers"], s["d_ff"], s["dropout"],
                         max_len=s["block_size"])


def _check_run(world_size: int, s: dict, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (mode == "single") != (world_size == 1):
        raise ValueError(f"mode {mode!r} with world_size={world_size}: 'single' is the one-process run, "
                         "the others need a process group of 2 or more")
    if s["batch_size"] % world_size:
        raise ValueError(f"world_size={world_size} must divide the batch of {s['batch_size']}")


def _trainer(rank: int, world_size: int, s: dict, mode: str, vocab: int):
    """(model, step): a fresh model from seed ``s["seed"]`` and its optimizer, wrapped for
    ``mode``; ``step(x, y)`` trains on this process's share of the batch and returns its loss."""
    from .train import param_groups
    torch.manual_seed(s["seed"])
    model = _language_model(s, vocab)
    net = model
    if mode in ("ddp", "zero"):  # gradients kept in DDP's buckets, not copied out of them
        net = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    if mode == "fsdp":  # FSDP2: each block's parameters sharded, gathered only while in use
        from torch.distributed.fsdp import fully_shard
        # the model's output is a view (a Linear on 3-D input); nothing modifies it in place,
        # which is what FSDP2's warning is about
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    groups = param_groups(model, s["weight_decay"])
    if mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        opt = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, lr=s["lr"],
                                      weight_decay=groups[0]["weight_decay"])
        for g in groups[1:]:
            opt.add_param_group(g)
    else:
        opt = torch.optim.AdamW(groups, lr=s["lr"])
    share = s["batch_size"] // world_size

    def step(x, y) -> torch.Tensor:
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad(set_to_none=mode not in ("ddp", "zero"))  # DDP's buckets stay allocated
        loss = lm_loss(net, xs, ys)
        loss.backward()
        if mode == "allreduce":
            allreduce_gradients(model)
        nn.utils.clip_grad_norm_(model.parameters(), s["clip_grad_norm"])
        opt.step()
        return loss.detach()
    step.optimizer = opt.optim if mode == "zero" else opt
    return model, step


MEMORY_REPEATS = 4   # train_data_parallel's memory: the least of this many measurements


def train_data_parallel(rank: int, world_size: int, s: dict, mode: str = "single", steps: int = 100) -> dict:
    """Train Chapter 6's language model (settings ``s``: its sizes, batch, AdamW learning rate,
    weight decay on 2-D weights, clipping; a constant learning rate) for ``steps`` steps as
    process ``rank`` of ``world_size``, each process on its ``1/world_size`` of every batch.

    ``mode``: "single" (one process, the whole batch: world_size 1, no process group needed),
    "allreduce" (``allreduce_gradients`` after each backward pass), "ddp" (PyTorch's
    ``DistributedDataParallel``), "zero" (DDP, and ``ZeroRedundancyOptimizer``: each process
    keeps the AdamW state of only its share of the parameters, updates that share and
    broadcasts it), "fsdp" (FSDP2's ``fully_shard`` on every block and on the model: each
    process keeps its share of the parameters, gradients and AdamW state, ZeRO stage 3; a
    block's parameters are gathered only while it computes). Every process starts from the same weights (seed ``s["seed"]``) and draws
    the same batches (Chapter 6's ``TokenBatches`` over its training split).

    Returns ``losses`` (the whole batch's mean loss at each step, averaged over the processes),
    ``params`` (the final weights, flattened), ``seconds`` (wall time of the steps),
    ``optimizer_state`` (bytes of this process's optimizer state) and ``peak`` and ``held``: the
    most bytes this process's training allocated at once, and what stayed allocated between
    steps (weights, gradients, optimizer state), measured with the profiler on a fresh model
    over its first 2 steps (CPU only): the measurement that held least of ``MEMORY_REPEATS``.
    (With DDP, about one measurement in six also counts a gradient-sized buffer that the next
    step frees, a communication buffer whose release, we believe, the profiler does not see.)
    """
    from .data import CharTokenizer, TokenBatches, load_text, split_tokens
    _check_run(world_size, s, mode)
    _positive_int(steps, "steps")
    text = load_text(s["text"])
    tok = CharTokenizer(text)
    train, _ = split_tokens(tok.encode(text), s["val_fraction"])
    batches = TokenBatches(train, s["block_size"], s["batch_size"], steps, s["seed"])
    model, step = _trainer(rank, world_size, s, mode, tok.vocab_size)
    losses = []
    start = time.perf_counter()
    for x, y in batches:
        loss = step(x, y)
        if world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= world_size
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    out = {"losses": losses, "seconds": seconds, "optimizer_state": optimizer_state_bytes(step.optimizer),
           "params": torch.cat([_full(p).detach().reshape(-1) for p in model.parameters()])}
    x, y = next(iter(batches))
    alive = []

    def fresh_run():
        m, st = _trainer(rank, world_size, s, mode, tok.vocab_size)
        st(x, y), st(x, y)
        drop_kept_weights(m)         # not training state: the attention weights kept for plots
        alive.append((m, st))
    levels = []
    for _ in range(MEMORY_REPEATS):
        levels.append(cpu_memory_levels(fresh_run))
        alive.clear()
    out["peak"], out["held"] = min(levels, key=lambda level: (level[1], level[0]))
    return out


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter FSDP2 sharded (a ``DTensor``: gathered from every
    process); any other tensor as it is."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def data_parallel_runs(rank: int, world_size: int, s: dict, runs: dict[str, int]) -> dict[str, dict]:
    """``train_data_parallel`` for each ``{mode: steps}`` of ``runs``, one after the other in the
    same processes (one launch): ``{mode: result}``."""
    return {mode: train_data_parallel(rank, world_size, s, mode, steps) for mode, steps in runs.items()}


def allreduce_times(rank: int, world_size: int, sizes: list[int], shapes: list[tuple[int, ...]],
                    repeats: int = 30) -> dict:
    """Seconds of one ``all_reduce`` (sum) of a float32 tensor of each of ``sizes`` elements:
    ``seconds``, the median of ``repeats`` calls (after one untimed), and ``fastest``, the
    quickest of them (the cost without interference from the rest of the machine); and of the
    tensors of ``shapes`` (a model's gradients) reduced one call per tensor, ``per_tensor``,
    against all of them flattened into one bucket, ``one_bucket``, as ``DistributedDataParallel``
    does (medians). Every call starts together in all processes (a barrier). Run in every
    process (``launch``)."""
    def timed(fn) -> list[float]:
        fn()
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)

    by_size = {}
    for n in sizes:
        t = torch.ones(n)
        by_size[n] = timed(lambda: dist.all_reduce(t))
    grads = [torch.ones(shape) for shape in shapes]
    flat = torch.ones(sum(g.numel() for g in grads))
    per_tensor = timed(lambda: [dist.all_reduce(g) for g in grads])
    bucketed = timed(lambda: dist.all_reduce(flat))
    mid = repeats // 2
    return {"sizes": list(sizes), "seconds": [by_size[n][mid] for n in sizes],
            "fastest": [by_size[n][0] for n in sizes], "tensors": len(grads), "elements": flat.numel(),
            "per_tensor": per_tensor[mid], "one_bucket": bucketed[mid]}
