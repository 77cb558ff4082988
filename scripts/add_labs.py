"""Insert (or refresh) each chapter's "## Labs" section before its "## Exercises": for each lab
a task, a code cell with a stub and the checker from ``efficientml.labs``, and the book's
solution in a dropdown (rendered from ``efficientml/lab_solutions.py``). Outputs of the new cells
come from executing the chapter (``make execute NB=...``). Run: python scripts/add_labs.py"""
import textwrap
from pathlib import Path

import nbformat

BOOK = Path(__file__).resolve().parents[1] / "book"

INTRO = """## Labs

Two functions of this chapter to write yourself. Each code cell below holds a stub: replace
`raise NotImplementedError` with your code and run the cell. The checker from
`efficientml.labs` calls your function on random and edge-case inputs, compares it with a
reference{ref}, and prints what passed or raises an error naming the case that failed (and
the mistake, where a common one explains it). The book's solutions are in the dropdowns
under the cells."""

LABS = {
    1: [dict(check="check_sgd_step", name="sgd_step", args="w, grad, buf, lr, momentum, weight_decay",
             title="one step of SGD with momentum",
             task="""The optimizer of this chapter in four lines. Given the weights `w`, their gradient `grad`,
the momentum buffer `buf` (None before the first step), the learning rate, the momentum and
the L2 weight decay, return the new weights and the new buffer, as `torch.optim.SGD` computes
them: the weight decay adds `weight_decay * w` to the gradient; the buffer is that gradient at
the first step and `momentum * buf + gradient` afterwards; the step is `lr` times the buffer
(or the gradient, without momentum). The checker takes five steps with a learning rate that
changes between them, as a schedule does, which tells apart two versions that agree at a
fixed learning rate.""",
             doc="w, grad, buf: tensors of one shape (buf None at the first step). Returns (w_new, buf_new)."),
        dict(check="check_cosine_lr", name="cosine_lr", args="epoch, epochs, lr_max, lr_min",
             title="the cosine schedule",
             task="""The learning rate of the cosine schedule (1.2) in epoch `epoch` of `epochs`: it starts
at `lr_max` and follows half a cosine down to `lr_min` at the last epoch. The checker compares
every epoch with `torch.optim.lr_scheduler.CosineAnnealingLR`.""",
             doc="The learning rate (a float) in epoch ``epoch`` (0 to ``epochs``)."),
        ],
    2: [dict(check="check_affine_quantize", name="affine_quantize", args="x, bits",
             title="affine quantization",
             task="""Chapter 2.1's formula, without the package: the range $[\\min(x, 0), \\max(x, 0)]$ in
$2^b - 1$ steps of size `scale`, the code `zero_point` that stands for 0, and the codes
`clamp(round(x / scale) + zero_point, 0, 2**bits - 1)`. The checker compares the scale and
zero point with `quantization.quantize`, checks that every value comes back within half a
step and 0 exactly, and gives your function a tensor of zeros (whose range is 0).""",
             doc="x: a float tensor; bits: 1 to 8. Returns (codes, scale, zero_point)."),
        dict(check="check_symmetric_per_channel", name="symmetric_per_channel", args="w, bits",
             title="symmetric quantization, a scale per channel",
             task="""One scale per row of a weight matrix (each output channel), symmetric: `scale = max|row| /
(2**(bits-1) - 1)` and signed codes `round(w / scale)`. The checker's weight has rows whose
sizes range over five orders of magnitude, which is why a scale per row matters, and a row of
zeros, which needs a scale too.""",
             doc="w: (out, in). Returns (codes, scales): codes (out, in), whole numbers; scales (out,)."),
        ],
    3: [dict(check="check_magnitude_prune", name="magnitude_prune", args="w, sparsity",
             title="unstructured magnitude pruning",
             task="""The mask of unstructured pruning: 0 at the `round(sparsity * w.numel())` weights of
smallest magnitude, 1 elsewhere, for a weight of any shape. The checker compares it with
`torch.nn.utils.prune.l1_unstructured`.""",
             doc="w: a weight of any shape; sparsity in [0, 1]. Returns a 0/1 mask shaped like w."),
        dict(check="check_filter_prune", name="filter_prune", args="w, sparsity",
             title="filter pruning by L1 norm",
             task="""The filter ranking of 3.1: for a convolution weight (out, in, kh, kw), the L1 norm of each
output filter, and `keep`, False for the `round(sparsity * out)` filters with the smallest
norms. The checker compares it with `torch.nn.utils.prune.ln_structured(n=1, dim=0)`.""",
             doc="w: (out, in, kh, kw); sparsity in [0, 1]. Returns keep, a bool tensor (out,)."),
        ],
    4: [dict(check="check_lora_forward", name="lora_forward", args="x, weight, bias, A, B, alpha",
             title="the forward pass of a LoRA layer",
             task="""The output of a Linear layer with a LoRA update: $y = x W^\\top + b + \\frac{\\alpha}{r}\\, x
A^\\top B^\\top$ with $W$ (out, in), $A$ (r, in) and $B$ (out, r); the bias may be None and $x$
may have any leading dimensions. Compute the update through $A$ first: $(x A^\\top) B^\\top$
costs $r(\\text{in} + \\text{out})$ multiply-adds per row, $x (BA)^\\top$ costs
$\\text{in} \\cdot \\text{out}$. The checker compares with `lora.LoRALinear`, with $B$ random
(it starts at zero in training, where any update would pass).""",
             doc="x (..., in), weight (out, in), bias (out,) or None, A (r, in), B (out, r). Returns y (..., out)."),
        dict(check="check_lora_merge", name="lora_merge", args="weight, A, B, alpha",
             title="merging the update",
             task="""The weight of one plain Linear layer that computes what the adapted layer computes, so
that serving the fine-tuned model costs nothing extra. The checker compares it with
`LoRALinear.merge` and the merged layer's outputs with the adapted layer's.""",
             doc="weight (out, in), A (r, in), B (out, r). Returns the merged weight (out, in)."),
        ],
    5: [dict(check="check_attention", name="scaled_dot_product_attention", args="q, k, v, mask=None",
             title="scaled dot-product attention",
             task="""5.1's attention: $\\operatorname{softmax}(q k^\\top / \\sqrt{d_k})\\, v$ over the last two
dimensions, with a boolean mask that is True where a query may see a key. The checker compares
with PyTorch's `F.scaled_dot_product_attention` on shapes with batch and head dimensions, with
$T_q \\ne T_k$, with a causal and a random mask, and on float32 scores large enough to make
`exp` overflow (which `softmax` avoids by subtracting each row's maximum first).""",
             doc="q (..., T_q, d_k), k (..., T_k, d_k), v (..., T_k, d_v), mask broadcastable to (..., T_q, T_k)."),
        dict(check="check_sinusoidal_encoding", name="positional_encoding", args="max_len, d_model",
             title="the sinusoidal positional encoding",
             task="""The table of 5.1: $PE_{pos, 2i} = \\sin(pos\\, \\omega_i)$ and $PE_{pos, 2i+1} =
\\cos(pos\\, \\omega_i)$ with $\\omega_i = 10000^{-2i/d_{model}}$. The checker compares with
`transformer.sinusoidal_encoding` and names the two usual slips (sine and cosine swapped, or
all sines before all cosines).""",
             doc="Returns the encoding (max_len, d_model)."),
        ],
    6: [dict(check="check_kv_cache_step", name="kv_cache_step", args="q, k, v, cache",
             title="one step of attention with a key-value cache",
             task="""What each layer does for one new token when generating with the cache: append the new key
and value (B, h, 1, d) to those in `cache` (a dict, empty before the first token, holding
`cache["k"]` and `cache["v"]` of shape (B, h, t, d)), then attend from the new query to all of
them. No mask is needed: the newest token may see every earlier one. Run token by token, the
outputs must equal causal attention over the whole sequence.""",
             doc="q, k, v: (B, h, 1, d) for the newest token; cache: a dict you keep. Returns (B, h, 1, d)."),
        dict(check="check_sampling_probs", name="sampling_probs", args="logits, temperature, top_k=None",
             title="temperature and top-k",
             task="""The distribution `generate` draws the next token from: the logits (B, V) divided by the
temperature, all but the `top_k` largest set to $-\\infty$ (when `top_k` is given), then a
softmax. `top_k` may exceed V: then every token is kept (use `min(top_k, V)`). The checker's
smallest temperatures make `exp` of the scaled logits overflow even in float64.""",
             doc="logits (B, V). Returns probabilities (B, V), rows summing to 1."),
        ],
    7: [dict(check="check_linear_flops", name="linear_flops", args="input_shape, out_features, input_requires_grad",
             title="the FLOPs of a Linear layer, forward and backward",
             task="""The count behind the roofline's x-axis (7.2) and the training estimate $6N$ per token (7.3):
the floating-point operations of `nn.Linear(input_shape[-1], out_features)` on an input of
`input_shape` (a multiply-add is 2), forward and backward. The backward computes the weight's
gradient and, only when the input requires one, the input's. The checker compares with
`torch.utils.flop_counter.FlopCounterMode`, which counts the products and not the bias.""",
             doc="Returns (forward_flops, backward_flops), two ints."),
        dict(check="check_to_bfloat16", name="to_bfloat16", args="x",
             title="rounding to bfloat16 by hand",
             task="""bfloat16 (7.5) is the top 16 bits of a float32: the sign, all 8 exponent bits and 7 of the 23
mantissa bits. Round a float32 tensor to it, returned as float32, with integer operations on
the bits (`x.view(torch.int32)`): round to nearest, ties to even, is adding `0x7FFF` plus the
lowest bit that is kept, then clearing the low 16 bits. The checker compares with
`x.to(torch.bfloat16)` on ties, numbers that round up to the next power of two, the largest
float32 (which overflows to infinity) and two thousand numbers from $10^{-30}$ to $10^{30}$.""",
             doc="x: float32. Returns float32 values that bfloat16 can hold."),
        ],
    8: [dict(check="check_gradient_accumulation", name="gradient_accumulation",
             args="model, loss_fn, x, y, micro_batch",
             title="gradient accumulation",
             task="""8.3's loop: leave in every parameter's `.grad` the gradient of `loss_fn(model(x), y)`, a
mean over the batch, while passing at most `micro_batch` rows through the model at a time.
Gradients left from an earlier step must not count, and when `micro_batch` does not divide the
batch the last, smaller micro-batch must weigh less. The checker compares with one backward
pass over the whole batch in float64 and watches the batch sizes the model sees.""",
             doc="Sets each parameter's .grad; returns nothing."),
        dict(check="check_ring_allreduce", name="ring_allreduce", args="vectors, send",
             title="a ring all-reduce",
             task="""How DDP's all-reduce (8.4) moves data. Rank $r$ holds `vectors[r]` (p 1-D tensors); data
moves only by `send(src, dst, tensor)`, which returns what rank `dst` receives and allows only
`dst = (src + 1) % p`. Return every rank's result, the sum of all vectors. Cut each vector into
$p$ chunks (`tensor_split`): in $p - 1$ steps of a **reduce-scatter** each rank passes one
chunk on and adds the chunk it receives, after which rank $r$ holds the sum of one chunk;
$p - 1$ steps of an **all-gather** pass the finished chunks around. The checker counts what
each rank sends: at most $2(p - 1)\\lceil n/p \\rceil$ elements, about $2n$ whatever $p$ is.""",
             doc="vectors: p tensors (n,); send(src, dst, tensor) -> tensor. Returns p tensors (n,)."),
        ],
    9: [dict(check="check_groupwise_rtn", name="groupwise_rtn", args="w, bits, group_size",
             title="group-wise round to nearest",
             task="""9.1's round to nearest, without the package: cut each row of a weight (out, in) into groups
of `group_size` consecutive weights, quantize each group with its own affine scale and zero
point (Chapter 2's formula, the range containing 0), and return the dequantized weight. The
checker compares with `serving.rtn`; its weight has an all-zero group.""",
             doc="w (out, in), group_size dividing in. Returns the dequantized weight (out, in)."),
        dict(check="check_speculative_accept", name="speculative_accept", args="p, q, x",
             title="the acceptance rule of speculative decoding",
             task="""9.5's rule for one guess: the draft proposed token `x` from its distribution `q`, the
target's is `p` (both (V,)). Return the probability of keeping the guess and the distribution
to draw from when it is rejected. The checker applies your rule to every token the draft can
propose and checks the theorem: the tokens that come out follow `p` exactly. When `p` equals
`q` nothing is ever rejected: return any distribution as the residual, `p` for example.""",
             doc="p, q: (V,) distributions; x: the proposed token. Returns (accept, residual)."),
        ],
}

REFERENCE = {1: " (PyTorch's optimizer and scheduler)", 3: " (`torch.nn.utils.prune`)",
             5: " (PyTorch's fused attention, and the package)", 7: " (PyTorch's FLOP counter and bfloat16)"}


def stub(lab: dict, first: bool) -> str:
    head = "from efficientml import labs\n\n\n" if first else ""
    doc = textwrap.fill(lab["doc"], 84, initial_indent="    \"\"\"", subsequent_indent="    ")
    doc += "\n    \"\"\"" if "\n" in doc else "\"\"\""
    return (f"{head}def {lab['name']}({lab['args']}):\n"
            f"{doc}\n"
            f"    raise NotImplementedError  # your code here\n\n\n"
            f"labs.{lab['check']}({lab['name']})")


def solution(lab: dict) -> str:
    return ("````{admonition} The book's solution\n:class: dropdown\n"
            "```{literalinclude} ../efficientml/lab_solutions.py\n:language: python\n"
            f":pyobject: {lab['name']}\n```\n````")


def main() -> None:
    for chapter, labs in LABS.items():
        (path,) = BOOK.glob(f"{chapter:02d}_*.ipynb")
        nb = nbformat.read(path, 4)
        cells = [c for c in nb.cells if not c.get("metadata", {}).get("lab")]   # drop an earlier version
        at = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises"))
        new = [nbformat.v4.new_markdown_cell(INTRO.format(ref=REFERENCE.get(chapter, "")))]
        for n, lab in enumerate(labs, 1):
            new.append(nbformat.v4.new_markdown_cell(f"### Lab {chapter}.{n}: {lab['title']}\n\n{lab['task']}"))
            new.append(nbformat.v4.new_code_cell(stub(lab, n == 1)))
            new.append(nbformat.v4.new_markdown_cell(solution(lab)))
        for c in new:
            c.metadata["lab"] = True
        nb.cells = cells[:at] + new + cells[at:]
        nbformat.write(nb, path)
        print(path.name, f"{len(labs)} labs")


if __name__ == "__main__":
    main()
