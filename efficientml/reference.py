"""The assignment's reference numbers (../shared/docs/SYLLABUS.md): what a team reported on a GPU.

They were measured on CIFAR-10 (Chapter 1, 3) or MNIST (Chapter 2), so they are a guide for
the full profile, not a target for the quick profile, which runs on a Fashion-MNIST subset.
Accuracies are fractions, times seconds.
"""
REFERENCE = {
    "lr-sweep": {"dataset": "CIFAR-10", "epochs": 5, "test_acc": {"0.0001": 0.365, "0.1": 0.622, "1.0": 0.399},
                 "time_s_each": 135},
    "schedules": {"dataset": "CIFAR-10", "epochs": 100,
                  "test_acc": {"multistep": 0.9183, "cosine": 0.8599}, "train_acc": {"multistep": 0.9949},
                  "time_s": {"multistep": 2711, "cosine": 2534}},
    "mlp-quantization": {"dataset": "MNIST", "test_acc": {"fp32": 0.9722, "8-bit": 0.9715, "4-bit": 0.9687}},
    # Not the assignment's: nanoGPT's character-level Tiny Shakespeare runs (its README) on the
    # same 90/10 split. Its CPU configuration (4 layers, 4 heads, 128 wide, context 64, batch 12,
    # 2000 iterations, no dropout) is the quick profile's; its GPU one (6 x 6 x 384, context
    # 256, batch 64, 5000 iterations, dropout 0.2) the full profile's. Validation loss in nats.
    "language-model": {"source": "nanoGPT, train_shakespeare_char", "dataset": "Tiny Shakespeare",
                       "val_loss_nats": {"cpu": 1.88, "gpu": 1.4697}},
}
