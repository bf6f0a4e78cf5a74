"""PyTorch baseline for NOVA's models benchmark: TAESD decode and encode at 512x512 on CPU.

Builds the TAESD encoder/decoder in plain PyTorch from the layer list in
shared/models/taesd/ARCHITECTURE.md, loads the same safetensors files NOVA loads, checks them
against the reference vectors (so both sides compute the same function), then times decode
(1x4x64x64 -> 1x3x512x512) and encode (the reverse) with the given thread count.

Prints one JSON object: {"torch": version, "threads": n, "decode_s": median, "encode_s": median,
"decode_max_err": e, "encode_max_err": e}.

Usage: python taesd_bench.py MODELS_DIR [--threads 2] [--runs 7]
"""

import argparse
import json
import statistics
import time

import torch
from safetensors.torch import load_file
from torch import nn

F = 64


def conv(n_in, n_out, stride=1, bias=True):
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(conv(F, F), nn.ReLU(), conv(F, F), nn.ReLU(), conv(F, F))

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def encoder(latent):
    layers = [conv(3, F), Block()]
    for _ in range(3):
        layers += [conv(F, F, stride=2, bias=False), Block(), Block(), Block()]
    layers.append(conv(F, latent))
    return nn.Sequential(*layers)


def decoder(latent):
    layers = [SoftClamp(), conv(latent, F), nn.ReLU()]
    for i in range(3):
        layers += [Block(), Block(), Block(), nn.Upsample(scale_factor=2),
                   conv(F, F, bias=False)]
    layers += [Block(), conv(F, 3)]
    return nn.Sequential(*layers)


def timed(f, x, runs):
    with torch.inference_mode():
        f(x)  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            f(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = f"{a.models}/taesd/synthetic-sd1-layout"
    dec, enc = decoder(4), encoder(4)
    dec.load_state_dict(load_file(f"{base}/taesd_decoder.safetensors"), strict=True)
    enc.load_state_dict(load_file(f"{base}/taesd_encoder.safetensors"), strict=True)
    dec.eval()
    enc.eval()
    ref = load_file(f"{base}/reference_64x64.safetensors")
    with torch.inference_mode():
        de = (dec(ref["latent"]) - ref["decoded"]).abs().max().item()
        ee = (enc(ref["input"]) - ref["latent"]).abs().max().item()
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 64, 64, generator=g)
    image = torch.rand(1, 3, 512, 512, generator=g)
    print(json.dumps({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "decode_s": timed(dec, latent, a.runs),
        "encode_s": timed(enc, image, a.runs),
        "decode_max_err": de,
        "encode_max_err": ee,
    }))


if __name__ == "__main__":
    main()
