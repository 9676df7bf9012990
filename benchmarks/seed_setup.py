"""The seed's Fashion-MNIST round as the one-round check scripts use it (cm_additive_check.py,
impulse_check.py): the same command-line options, the data set and the CNN (optionally from a
run's checkpoint), in training mode."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from fedbgmd.data import Dataset, load_dataset
from fedbgmd.models import build_model


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="a run's checkpoint.pt (default: init)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--byzantine", type=int, default=12)
    ap.add_argument("--lr", type=float, default=0.01)
    return ap.parse_args()


def load_setup(args: argparse.Namespace) -> tuple[Dataset, nn.Module]:
    ds = load_dataset("fashion_mnist")
    model = build_model("cnn", ds.num_classes, ds.input_shape, seed=args.seed)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True)["model"])
    model.train()
    return ds, model
