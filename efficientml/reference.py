"""The assignment's reference numbers (../shared/docs/SYLLABUS.md): what a team reported on a GPU.

They were measured on CIFAR-10 (Chapter 1, 3) or MNIST (Chapter 2), so they are a guide for
the full profile, not a target for the quick profile, which runs on a Fashion-MNIST subset.
Accuracies are fractions, times seconds.
"""
REFERENCE = {
    "lr-sweep": {"dataset": "CIFAR-10", "epochs": 5,
                 "test_acc": {"0.0001": 0.365, "0.1": 0.622, "1.0": 0.399}, "time_s_each": 135},
    "schedules": {"dataset": "CIFAR-10", "epochs": 100,
                  "test_acc": {"multistep": 0.9183, "cosine": 0.8599}, "train_acc": {"multistep": 0.9949},
                  "time_s": {"multistep": 2711, "cosine": 2534}},
    "mlp-quantization": {"dataset": "MNIST", "test_acc": {"fp32": 0.9722, "8-bit": 0.9715, "4-bit": 0.9687}},
    # Not the assignment's: nanoGPT's character-level Tiny Shakespeare runs, as its README
    # (https://github.com/karpathy/nanoGPT, "quick start", data/shakespeare_char) reports them, on
    # the same 90/10 cut of the same text. Its CPU configuration (4 layers, 4 heads, 128 wide,
    # context 64, batch 12, 2000 iterations, no dropout) is the quick profile's: "validation loss
    # to 1.88"; its GPU one (config/train_shakespeare_char.py: 6 x 6 x 384, context 256, batch 64,
    # 5000 iterations, dropout 0.2) the full profile's: "validation loss of 1.4697". Both are
    # F.cross_entropy, natural log: nats per character.
    "language-model": {"source": "nanoGPT README, shakespeare_char (CPU and GPU configurations)",
                       "url": "https://github.com/karpathy/nanoGPT", "dataset": "Tiny Shakespeare",
                       "unit": "nats per character", "val_loss_nats": {"cpu": 1.88, "gpu": 1.4697}},
}
