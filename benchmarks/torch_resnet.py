"""PyTorch twin of `IterativeResNet`, for side-by-side training throughput.

The network is layer for layer the Keras one (`iterconv_keras/models/resnet.py`,
`blocks.py`): input normalisation, stem ``Conv3x3 -> BN -> ReLU`` (optionally
stride 2), per stage an uncoupled transition ``BN -> ReLU -> Conv3x3/2`` (none
in stage 0 when the stem already has its width), T pre-activation blocks
``x + conv(relu(bn(conv(relu(bn(x))))))`` without bias, and the head
``BN -> ReLU -> global average pooling -> Linear``. Batch norm uses Keras'
defaults (epsilon 1e-3, moving-average momentum 0.9 = PyTorch momentum 0.1);
Adam uses Keras' epsilon 1e-7. The training step does what ours does:

- soft gradient coupling (docs/method.md, "Soft gradient coupling") between ``backward`` and the
  optimizer step, with ``torch._foreach`` ops (one fused kernel per list);
- with ``lipschitz`` set, gain-capped batch norm inside the blocks and, after
  each optimizer step, one power iteration per block convolution (conv and
  transposed conv on the persistent vector) and the soft rescale
  ``W <- W * min(1, c_l / sigma)`` (docs/lipschitz.md).

It is a benchmark reference, not part of the package: ``torch`` is not a
dependency. ``benchmarks/run_all.py`` drives it in a subprocess (``--serve``)
so the two frameworks never share a process or thread pool.

    python benchmarks/torch_resnet.py --variant small --steps 20   # standalone
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.1  # Keras momentum 0.9

# The rows of `iterconv_keras.models.variants` this twin mirrors (kept in sync by hand;
# run_all.py passes the Keras model's own config, so drift shows as a KeyError).
VARIANTS = {
    "tiny": dict(stage_widths=(4, 8), blocks_per_stage=2, stem_stride=1),
    "small": dict(stage_widths=(16, 32, 64), blocks_per_stage=4, stem_stride=2),
    "paper_mnist": dict(stage_widths=(32, 64, 128), blocks_per_stage=8, stem_stride=1),
    "paper_cifar": dict(stage_widths=(64, 128, 256), blocks_per_stage=8, stem_stride=1),
}


class GainCappedBatchNorm2d(nn.BatchNorm2d):
    """Batch norm with per-channel gain ``gamma / sqrt(var + eps)`` clipped to +-max_gain.

    The PyTorch counterpart of `lipschitz.GainCappedBatchNormalization`: batch
    statistics in training, moving ones at inference, running statistics
    updated as ``nn.BatchNorm2d`` does.
    """

    def __init__(self, channels, max_gain=1.0):
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.max_gain = max_gain

    def forward(self, x):
        if self.training:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        gain = torch.clamp(self.weight * torch.rsqrt(var + self.eps), -self.max_gain, self.max_gain)
        offset = self.bias - mean * gain
        return x * gain[None, :, None, None] + offset[None, :, None, None]


def _norm(channels, capped=False):
    return GainCappedBatchNorm2d(channels) if capped else nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv(cin, cout, stride=1):
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return conv


class Block(nn.Module):
    """Pre-activation residual block ``x + f(x)``, no activation after the sum."""

    def __init__(self, width, capped=False):
        super().__init__()
        self.norm1, self.conv1 = _norm(width, capped), _conv(width, width)
        self.norm2, self.conv2 = _norm(width, capped), _conv(width, width)

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(h)))


class TorchIterativeResNet(nn.Module):
    """The `IterativeResNet` architecture in PyTorch (see the module docstring)."""

    def __init__(self, image_shape, num_classes, stage_widths, blocks_per_stage, stem_stride, lipschitz=None):
        super().__init__()
        _, _, channels = image_shape
        self.stem = nn.Sequential(_conv(channels, stage_widths[0], stem_stride), _norm(stage_widths[0]), nn.ReLU())
        stages = []
        for s, width in enumerate(stage_widths):
            layers = []
            if s > 0:
                layers += [_norm(stage_widths[s - 1]), nn.ReLU(), _conv(stage_widths[s - 1], width, 2)]
            layers += [Block(width, capped=lipschitz is not None) for _ in range(blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head_norm = _norm(stage_widths[-1])
        self.head = nn.Linear(stage_widths[-1], num_classes)
        self.tie_blocks()

    def blocks(self, stage):
        return [m for m in self.stages[stage] if isinstance(m, Block)]

    @torch.no_grad()
    def tie_blocks(self):
        """Start every block of a stage from block 0's weights, as the Keras model does."""
        for s in range(len(self.stages)):
            first, *rest = self.blocks(s)
            for block in rest:
                block.load_state_dict(first.state_dict())

    def forward(self, x):
        # The Keras model normalises inside (mean 0, std 1 unless a dataset sets them).
        h = self.stem((x - 0.0) / 1.0)
        for stage in self.stages:
            h = stage(h)
        h = F.relu(self.head_norm(h))
        return self.head(h.mean(dim=(2, 3)))


class Coupler:
    """Soft gradient coupling ``g_t <- (1 - lam) g_t + lam * mean_t g_t`` per parameter position."""

    def __init__(self, model, strength):
        self.strength = strength
        # groups[k] = the k-th parameter of every block of one stage.
        self.groups = []
        for s in range(len(model.stages)):
            per_block = [list(b.parameters()) for b in model.blocks(s)]
            if len(per_block) > 1:
                self.groups.extend(zip(*per_block, strict=True))

    @torch.no_grad()
    def __call__(self):
        if self.strength == 0.0:
            return
        for group in self.groups:
            grads = [p.grad for p in group]
            mean = torch.stack(grads).mean(dim=0)
            torch._foreach_mul_(grads, 1.0 - self.strength)
            torch._foreach_add_(grads, [mean] * len(grads), alpha=self.strength)


class Constraint:
    """One power iteration per block conv and ``W <- W * min(1, bound / sigma)`` after each step."""

    def __init__(self, model, lipschitz, feature_shapes, memory_format):
        self.bound = math.sqrt(lipschitz)  # per conv, ReLU and gain-capped BN (lipschitz.per_conv_bound)
        self.items = []
        generator = torch.Generator().manual_seed(20190101)
        for s, (h, w, c) in enumerate(feature_shapes):
            u = torch.randn(1, c, h, w, generator=generator)
            u = (u / u.norm()).contiguous(memory_format=memory_format)
            for block in model.blocks(s):
                for conv in (block.conv1, block.conv2):
                    self.items.append((conv.weight, u.clone()))

    def project(self, iterations=1):
        with torch.no_grad():
            for weight, u in self.items:
                for _ in range(iterations):
                    w = F.conv_transpose2d(F.conv2d(u, weight, padding=1), weight, padding=1)
                    norm = w.norm()
                    u.copy_(w / norm.clamp_min(1e-30))
                weight.mul_(torch.clamp(self.bound / norm.sqrt(), max=1.0))


def feature_shapes(image_shape, stage_widths, stem_stride):
    """``(H, W, C)`` of the feature map inside each stage."""
    h, w, _ = image_shape
    h, w = math.ceil(h / stem_stride), math.ceil(w / stem_stride)
    shapes = []
    for s, width in enumerate(stage_widths):
        if s > 0:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        shapes.append((h, w, width))
    return shapes


class Trainer:
    """A model, its optimizer and in-memory uint8 data; ``run(steps)`` times training steps.

    Each step gathers a shuffled batch from uint8 images and scales it to [0, 1]
    (what our tf.data pipeline does), normalises, runs forward, backward,
    coupling, Adam and (if constrained) the projection, and reads back the loss
    (Keras' fit reads the loss every step too).
    """

    def __init__(self, variant, image_shape, num_classes, batch_size, coupling=0.0, lipschitz=None,
                 channels_last=True, lr=0.002, seed=0, images=None):
        torch.manual_seed(seed)
        kwargs = VARIANTS[variant]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = TorchIterativeResNet(image_shape, num_classes, lipschitz=lipschitz, **kwargs)
        self.model.to(memory_format=self.memory_format).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, eps=1e-7)
        self.coupler = Coupler(self.model, coupling)
        self.constraint = None
        if lipschitz is not None:
            shapes = feature_shapes(image_shape, kwargs["stage_widths"], kwargs["stem_stride"])
            self.constraint = Constraint(self.model, lipschitz, shapes, self.memory_format)
            self.constraint.project(iterations=200)  # feasible start, as the Keras model does
        self.batch_size = batch_size
        h, w, c = image_shape
        n = images if images is not None else 20 * batch_size
        self.images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8)
        self.labels = torch.randint(0, num_classes, (n,))
        self.order = torch.randperm(n)
        self.cursor = 0

    def _batch(self):
        if self.cursor + self.batch_size > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.order)), 0
        idx = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        x = self.images[idx].to(torch.float32).mul_(1.0 / 255.0).contiguous(memory_format=self.memory_format)
        return x, self.labels[idx]

    def step(self):
        x, y = self._batch()
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.coupler()
        self.optimizer.step()
        if self.constraint is not None:
            self.constraint.project()
        return loss.item()

    def run(self, steps):
        """Seconds per step over ``steps`` steps after one untimed step."""
        self.step()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps


def serve(stream_in, stream_out):
    """JSON-lines protocol for run_all.py: ``{"make": name, ...}`` / ``{"run": name, "steps": n}``."""
    trainers = {}
    for line in stream_in:
        request = json.loads(line)
        if "make" in request:
            name = request.pop("make")
            trainers[name] = Trainer(**request)
            reply = {"ok": name}
        elif "run" in request:
            reply = {"seconds_per_step": trainers[request["run"]].run(request["steps"])}
        else:
            break
        stream_out.write(json.dumps(reply) + "\n")
        stream_out.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="small", choices=sorted(VARIANTS))
    parser.add_argument("--image-shape", default="32,32,1")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--coupling", type=float, default=0.0)
    parser.add_argument("--lipschitz", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--serve", action="store_true", help="JSON-lines driver mode (run_all.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        serve(sys.stdin, sys.stdout)
        return
    shape = tuple(int(d) for d in args.image_shape.split(","))
    trainer = Trainer(args.variant, shape, 10, args.batch, args.coupling, args.lipschitz,
                      channels_last=not args.no_channels_last)
    trainer.run(2)
    seconds = trainer.run(args.steps)
    print(json.dumps({"variant": args.variant, "images_per_second": round(args.batch / seconds, 1),
                      "channels_last": not args.no_channels_last, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
