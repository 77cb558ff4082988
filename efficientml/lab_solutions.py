"""The book's solutions to the labs (``efficientml.labs`` checks them; each chapter
shows its own in a dropdown under the lab). Written as a reader would write them: the
formula, short, without the package's input checks."""
import math

import torch


# -- Chapter 1 -------------------------------------------------------------------------

def sgd_step(w, grad, buf, lr, momentum, weight_decay):
    g = grad + weight_decay * w           # L2 weight decay: the gradient of wd/2 |w|^2
    if momentum:
        buf = g.clone() if buf is None else momentum * buf + g
        g = buf
    return w - lr * g, buf


def cosine_lr(epoch, epochs, lr_max, lr_min):
    return lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


# -- Chapter 2 -------------------------------------------------------------------------

def affine_quantize(x, bits):
    qmax = 2 ** bits - 1
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)          # the range contains 0
    scale = (hi - lo) / qmax if hi > lo else torch.tensor(1.0)   # all zeros: any scale
    zero_point = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return codes.to(torch.uint8), scale, zero_point


def symmetric_per_channel(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scales = w.abs().amax(dim=1) / qmax                           # one per row
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.clamp(torch.round(w / scales[:, None]), -qmax, qmax)
    return codes.to(torch.int8), scales


# -- Chapter 3 -------------------------------------------------------------------------

def magnitude_prune(w, sparsity):
    n_pruned = round(sparsity * w.numel())
    mask = torch.ones_like(w, dtype=torch.bool)
    smallest = w.abs().flatten().argsort()[:n_pruned]
    mask.view(-1)[smallest] = False
    return mask


def filter_prune(w, sparsity):
    n_pruned = round(sparsity * w.shape[0])
    l1 = w.abs().sum(dim=(1, 2, 3))                       # one norm per output filter
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    keep[l1.argsort()[:n_pruned]] = False
    return keep


# -- Chapter 4 -------------------------------------------------------------------------

def lora_forward(x, weight, bias, A, B, alpha):
    r = A.shape[0]
    y = x @ weight.T + (0 if bias is None else bias)
    return y + (alpha / r) * (x @ A.T @ B.T)


def lora_merge(weight, A, B, alpha):
    return weight + (alpha / A.shape[0]) * (B @ A)


# -- Chapter 5 -------------------------------------------------------------------------

def scaled_dot_product_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v                     # softmax subtracts the max


def positional_encoding(max_len, d_model):
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    omega = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * omega)
    pe[:, 1::2] = torch.cos(pos * omega)
    return pe.float()


# -- Chapter 6 -------------------------------------------------------------------------

def kv_cache_step(q, k, v, cache):
    if "k" in cache:
        k = torch.cat([cache["k"], k], dim=2)
        v = torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    return weights @ v                    # the newest token may see every cached one


def sampling_probs(logits, temperature, top_k=None):
    z = logits / temperature
    if top_k is not None:
        kth = z.topk(min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return z.softmax(dim=-1)


# -- Chapter 7 -------------------------------------------------------------------------

def linear_flops(input_shape, out_features, input_requires_grad):
    rows = math.prod(input_shape[:-1])    # each leading dimension: rows of the product
    one = 2 * rows * input_shape[-1] * out_features
    return one, one * (2 if input_requires_grad else 1)


def to_bfloat16(x):
    bits = x.view(torch.int32)
    lowest_kept = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lowest_kept) & -65536              # -65536 = 0xFFFF0000
    return rounded.view(torch.float32)


# -- Chapter 8 -------------------------------------------------------------------------

def gradient_accumulation(model, loss_fn, x, y, micro_batch):
    model.zero_grad(set_to_none=True)
    n = x.shape[0]
    for start in range(0, n, micro_batch):
        xs, ys = x[start:start + micro_batch], y[start:start + micro_batch]
        loss = loss_fn(model(xs), ys) * (xs.shape[0] / n)  # its share of the mean
        loss.backward()                                           # adds into .grad


def ring_allreduce(vectors, send):
    p = len(vectors)
    chunks = [list(v.tensor_split(p)) for v in vectors]          # chunks[rank][i]
    for step in range(p - 1):                             # reduce-scatter
        for rank in range(p):
            i, right = (rank - step) % p, (rank + 1) % p
            chunks[right][i] = chunks[right][i] + send(rank, right, chunks[rank][i])
    for step in range(p - 1):                             # all-gather
        for rank in range(p):
            i, right = (rank + 1 - step) % p, (rank + 1) % p  # a finished chunk
            chunks[right][i] = send(rank, right, chunks[rank][i])
    return [torch.cat(c) for c in chunks]


# -- Chapter 9 -------------------------------------------------------------------------

def groupwise_rtn(w, bits, group_size):
    groups = w.reshape(-1, group_size)                            # each row of groups
    qmax = 2 ** bits - 1
    lo = groups.amin(dim=1, keepdim=True).clamp(max=0)
    hi = groups.amax(dim=1, keepdim=True).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(groups / scale) + zero, 0, qmax)
    return ((codes - zero) * scale).reshape(w.shape)


def speculative_accept(p, q, x):
    accept = min(1.0, (p[x] / q[x]).item())
    residual = (p - q).clamp(min=0)
    if residual.sum() == 0:                   # p = q: no guess is ever rejected
        return accept, p
    return accept, residual / residual.sum()
