"""The small model and optimizer arguments shared by the checkpoint tests."""
import torch

SHAPES = {"emb": (50, 40), "w1": (33, 100), "b1": (33,), "w2": (300, 7), "tiny": (3,)}
KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)


def make_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for name, shape in SHAPES.items():
        model.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))
    return model
