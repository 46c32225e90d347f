"""Block reconstruction without data (BRECQ / QDrop, as Genie runs it on distilled samples).

The grids are decided before this runs: every quantized layer has its weight scale and a starting
rounding (nearest or SQuant), every quantized activation its scale and zero point. The graph is cut into
blocks where a single float tensor is alive (after a residual block, after a layer in a plain chain), and
block by block, in graph order:

- the quantized block reads what the already reconstructed blocks before it produce, the target is the
  FP32 block's output on the FP32 path (both on the same calibration samples);
- each weight's rounding is learnt (AdaRound's rectified sigmoid between floor and floor + 1, pushed to a
  hard decision by an annealed regulariser), so it stays within one step of the float weight. The soft
  rounding starts next to the starting integers, not at the float weight as in AdaRound: the biases handed
  over were corrected for the starting rounding (bias correction), and float weights under those biases
  start far off (MobileNet-V1's conv_pw_1: 6x the starting rounding's error);
- each sub-8-bit activation's step size is learnt (LSQ: a straight-through round, the scale's gradient
  flows), and its quantization is dropped at random per element while learning (QDrop), which keeps the
  learnt weights flat against the activation noise they meet at inference. 8-bit grids stay as calibrated;
- with ``fisher_draws`` the loss weights each output channel's squared error, per sample, by the FP32 model's
  Fisher information there (BRECQ's weighting; the class is drawn from the model's own prediction, so no label is
  needed), measured once before the first block.

Only numbers come out: integer weights and activation scales, which the pipeline writes into its grids, so
the QDQ file is emitted exactly as without reconstruction. Everything here is torch; the caller passes
plain numpy arrays and ONNX models.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .executor import _OPS, TorchGraph
from .ops_tensor import NodeSpec

__all__ = ["WeightGrid", "ActGrid", "ReconstructOptions", "BlockReport", "ReconstructResult", "find_blocks",
           "reconstruct", "round_soft", "rectified_sigmoid"]

logger = logging.getLogger(__name__)

# samples per optimiser step when the batch is not given: 32 at CIFAR's 32 px, 8 at 224 px (a step of a MobileNet
# block at 112 px and batch 32 took seconds on 2 cores)
BATCH_PIXELS = 8 * 224 * 224

# AdaRound's stretch of the sigmoid: h(V) = clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1) reaches 0 and 1 exactly
ZETA, GAMMA = 1.1, -0.1


@dataclass
class WeightGrid:
    """One quantized layer: its grid and where the rounding starts (canonical layout [O, ...])."""

    scale: np.ndarray  # [O] or [1]
    w_int: np.ndarray  # the starting integers (nearest / SQuant / DF-MPC)
    qmin: int
    qmax: int
    swap_axes: bool = False  # the stored weight is the canonical one with axes 0 and 1 swapped (Gemm, MatMul)


@dataclass
class ActGrid:
    """One quantized activation tensor: an affine grid, scale learnt, zero point kept."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass
class ReconstructOptions:
    steps: int = 500  # optimiser steps per block
    batch_size: int | None = None  # None: BATCH_PIXELS worth of input pixels, 4 to 32 samples
    # Adam on the rounding variables (BRECQ: 1e-3 over 20 000 steps); ResNet-20 W4A4 on DFFG samples, 500 steps:
    # 86.8 % at 1e-2, 87.15 at 3e-2 (2000 test images)
    lr_round: float = 3e-2
    lr_scale: float = 1e-3  # Adam on the log of the activation step sizes (0.1 % a step)
    # the rounding regulariser's weight. AdaRound / BRECQ's 0.01 over 20 000 steps leaves 5-20 % of MobileNet-V1's
    # weights undecided after 500 (h in (0.1, 0.9)); their hard rounding then lost to the start on held-out samples
    # in 17 of 28 blocks. At 10 (with start_slack) 2 of 28 do, and MobileNet-V1 W4A8 on 192 real images rose from
    # 71.63 to 73.27 %, ResNet-20 W4A4 (DFFG) 87.51 -> 88.11
    round_weight: float = 10.0
    # the soft rounding starts this far from the starting integer (h = slack or 1 - slack); None: at the float
    # weight (AdaRound's start)
    start_slack: float | None = 0.05
    warmup: float = 0.2  # fraction of the steps before the regulariser starts
    beta: tuple[float, float] = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
    drop_prob: float = 0.5  # QDrop: chance that an activation element skips quantization while learning
    # QDrop's input mixing: while learning, each element of a block's input comes from the FP32 path with this
    # chance instead of the already reconstructed blocks (0: the quantized path only, BRECQ)
    input_mix: float = 0.0
    learn_act: bool = True  # sub-8-bit grids only (MobileNet-V1 W4A8, real images: 72.50 % learning them, 73.27 not)
    # samples kept out of the optimisation: a block's loss before and after is measured on them, and a block
    # that got worse there keeps its start (MobileNet-V1's 768 -> 1001 classifier, fit on 96 samples, fell apart)
    holdout: float = 0.25
    learn_bias: bool = False  # a learnt offset on each layer's bias (lr_bias), on top of the analytic correction
    lr_bias: float = 1e-3
    # every block's FP32 and quantized inputs and targets are held for all samples between blocks: float16 halves
    # that (MobileNet-V1 at 224 px and 256 samples: 3.97 GB peak in float32, 3.33 in float16); the arithmetic stays
    # float32
    store_half: bool = False
    # BRECQ's Fisher weighting without labels: each block output channel's squared error is weighted per sample by
    # the squared gradient of log p(y) at that channel (mean over positions), y drawn from the FP32 model's own
    # prediction this many times (0: plain MSE)
    fisher_draws: int = 0
    seed: int = 0
    device: str = "cpu"
    # torch.compile each block's learning step (two graphs a block: before and after the regulariser starts). On
    # the CPU inductor fuses the fake quantization and QDrop's random masks around each conv: at one thread
    # MobileNet-V1 W4A8's steps took 331 ms summed over its 28 blocks against 696 eager, after 1-1.5 min of compiling
    # from a cold cache (two threads; Lite0 5-6 min); ResNet-20's small convs gain nothing (389 against 385 ms). On
    # CUDA the step is also replayed as a CUDA graph (not measured: no GPU). A compile failure (no C++ compiler, say)
    # falls back to eager
    compile: bool = False


@dataclass
class BlockReport:
    name: str
    layers: list[str]
    acts: list[str]
    loss_before: float  # mean squared error of the block output against FP32 per element, held-out samples
    loss_after: float
    flipped: int  # weights whose rounding differs from the start
    seconds: float


@dataclass
class ReconstructResult:
    w_int: dict[str, np.ndarray]  # layer -> learnt integers (canonical layout)
    act_scales: dict[str, float]  # tensor -> learnt scale
    blocks: list[BlockReport] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    outputs: tuple[np.ndarray, ...] = ()  # the quantized graph's outputs on the samples, after the last block
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> learnt bias (learn_bias only)
    fisher_seconds: float = 0.0  # measuring the Fisher weights (fisher_draws)
    compiled: bool = False  # the learning steps ran under torch.compile
    compile_error: str = ""  # why compiling failed (the steps then ran eager)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _initial_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = rest (in (0, 1)): the inverse of the rectified sigmoid."""
    rest = np.clip(rest, 0.01, 0.99)
    return -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def round_soft(w: np.ndarray, scale: np.ndarray, w_int: np.ndarray, slack: float | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(floor of w / scale, starting soft rest, which weights can learn). With ``slack`` the rest starts that far
    from the starting rounding (slack below or above one half); without it at the fractional part, moved past
    one half where the starting rounding went the other way than nearest (SQuant's flips). Either way the hard
    decision at step 0 is the starting rounding. Weights whose start is not floor or floor + 1 (a grid edge,
    DF-MPC's ternary layers) keep their integer."""
    shape = [-1] + [1] * (w.ndim - 1)
    scaled = w.astype(np.float64) / np.asarray(scale, np.float64).reshape(shape if scale.size > 1 else ())
    base = np.floor(scaled)
    up = w_int - base
    learnable = (up == 0) | (up == 1)
    if slack is not None:
        return base, np.where(up == 1, 1.0 - slack, slack), learnable
    frac = scaled - base
    rest = np.where(up == 1, np.maximum(frac, 0.55), np.minimum(frac, 0.45))
    return base, rest, learnable


class _RoundRecipe(torch.nn.Module):
    """A layer's learnable rounding: w_q = s * clip(floor + h(V), qmin, qmax)."""

    def __init__(self, w: np.ndarray, grid: WeightGrid, device: str, slack: float | None) -> None:
        super().__init__()
        base, rest, learnable = round_soft(w, grid.scale, grid.w_int, slack)
        shape = [-1] + [1] * (w.ndim - 1)
        scale = np.asarray(grid.scale, np.float64).reshape(shape if grid.scale.size > 1 else [1] * w.ndim)
        self.register_buffer("base", torch.tensor(np.where(learnable, base, grid.w_int), dtype=torch.float32,
                                                  device=device))
        self.register_buffer("mask", torch.tensor(learnable, dtype=torch.float32, device=device))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32, device=device))
        self.register_buffer("start", torch.tensor(grid.w_int, dtype=torch.float32, device=device))
        self.v = torch.nn.Parameter(torch.tensor(_initial_v(rest), dtype=torch.float32, device=device))
        self.qmin, self.qmax, self.swap = grid.qmin, grid.qmax, grid.swap_axes
        self.hard = False
        self.bias_delta = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=torch.float32, device=device))

    def integers(self) -> torch.Tensor:
        step = (self.v >= 0).float() if self.hard else rectified_sigmoid(self.v)
        return torch.clamp(self.base + step * self.mask, self.qmin, self.qmax)

    def weight(self) -> torch.Tensor:
        w = self.integers() * self.scale
        return w.transpose(0, 1) if self.swap else w

    def regulariser(self, beta: float) -> torch.Tensor:
        h = rectified_sigmoid(self.v)
        return ((1.0 - (2.0 * h - 1.0).abs().pow(beta)) * self.mask).sum()


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad


class _ActQuant(torch.nn.Module):
    """LSQ fake quantization of one tensor: (clip(round(x / s) + z, qmin, qmax) - z) s, s learnt."""

    def __init__(self, grid: ActGrid, device: str) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(max(grid.scale, 1e-12)), device=device))
        self.zero_point, self.qmin, self.qmax = float(grid.zero_point), grid.qmin, grid.qmax
        # an 8-bit grid is fixed and always applied: its noise is too small for QDrop to matter, and learning its
        # step on a few hundred samples fits those samples
        self.fine = grid.qmax - grid.qmin >= 255

    @property
    def scale(self) -> float:
        return float(self.log_scale.detach().exp())

    def forward(self, x: torch.Tensor, drop: float = 0.0) -> torch.Tensor:
        s = self.log_scale.exp()
        q = torch.clamp(_RoundSTE.apply(x / s) + self.zero_point, self.qmin, self.qmax)
        y = (q - self.zero_point) * s
        if drop > 0 and not self.fine:
            return torch.where(torch.rand_like(x) < drop, x, y)
        return y


@dataclass
class Block:
    nodes: list[NodeSpec]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layers: list[str]


def _is_float(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def find_blocks(graph: TorchGraph, float_tensors: set[str], layers: set[str], *, min_layers: int = 1) -> list[Block]:
    """Cut the graph where exactly one float activation is alive (a residual block is one piece, a plain chain
    such as MobileNet-V1 one piece per layer), then join neighbouring pieces with fewer than ``min_layers``
    quantized layers; pieces without a quantized layer join the block before them. Layer by layer in chains:
    MobileNet-V1 W4A8 on 256 real images, 100 steps, 68.8 % vs 65.4 with pointwise -> depthwise pairs (67.9
    without reconstruction); a ResNet's blocks are the same either way."""
    nodes = list(graph._nodes)
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.inputs:
            if name in float_tensors:
                last_use[name] = index
    outputs = set(graph.output_names)
    for name in outputs:
        last_use[name] = len(nodes)
    for name in graph.input_names:
        last_use.setdefault(name, -1)
    live: set[str] = {name for name in graph.input_names if name in float_tensors}
    pieces: list[tuple[int, int, tuple[str, ...]]] = []  # (first node, end node, live inputs at the start)
    start, start_live = 0, tuple(sorted(live))
    for index, node in enumerate(nodes):
        for name in node.outputs:
            if name in float_tensors:
                live.add(name)
        live = {name for name in live if last_use.get(name, -1) > index}
        if len(live) == 1 and index + 1 < len(nodes):
            pieces.append((start, index + 1, start_live))
            start, start_live = index + 1, tuple(live)
    pieces.append((start, len(nodes), start_live))
    blocks: list[Block] = []
    pending: list[tuple[int, int, tuple[str, ...]]] = []

    def count(first: int, end: int) -> int:
        return sum(nodes[i].name in layers for i in range(first, end))

    def flush() -> None:
        first, end = pending[0][0], pending[-1][1]
        block_nodes = nodes[first:end]
        after = nodes[end:]
        produced = {name for node in block_nodes for name in node.outputs}
        needed_later = {name for node in after for name in node.inputs} | outputs
        block_outputs = tuple(sorted(name for name in produced if name in needed_later and name in float_tensors))
        blocks.append(Block(block_nodes, pending[0][2], block_outputs,
                            [node.name for node in block_nodes if node.name in layers]))
        pending.clear()

    for piece in pieces:
        have = sum(count(p[0], p[1]) for p in pending)
        new = count(piece[0], piece[1])
        if pending and have and new and (have >= min_layers or new >= min_layers):
            flush()
        pending.append(piece)
    if pending:
        flush()
    # a block without a quantized layer (a trailing Softmax) joins the one before it
    merged: list[Block] = []
    for block in blocks:
        if merged and not block.layers:
            prev = merged[-1]
            merged[-1] = Block(prev.nodes + block.nodes, prev.inputs, block.outputs, prev.layers)
        else:
            merged.append(block)
    return merged


class _Runner:
    """Runs a block's nodes on the FP32 path or the quantized path (learnable weights and activation grids)."""

    def __init__(self, fp: TorchGraph, quant: TorchGraph, side: dict[str, torch.Tensor]) -> None:
        self.fp, self.quant, self.side = fp, quant, side
        self.recipes: dict[str, _RoundRecipe] = {}
        self.acts: dict[str, _ActQuant] = {}

    def run(self, block: Block, values: tuple[torch.Tensor, ...], *, quantized: bool, drop: float = 0.0,
            fp_nodes: list[NodeSpec] | None = None) -> tuple[torch.Tensor, ...]:
        graph = self.quant if quantized else self.fp
        env: dict[str, torch.Tensor] = dict(zip(block.inputs, values, strict=True))
        if quantized:
            for name in block.inputs:
                if name in self.acts:
                    env[name] = self.acts[name](env[name], drop)
        for node in (block.nodes if quantized or fp_nodes is None else fp_nodes):
            args = [self._lookup(graph, env, name) if name else None for name in node.inputs]
            if quantized and node.name in self.recipes:
                recipe = self.recipes[node.name]
                args[1] = recipe.weight()
                if len(args) > 2 and args[2] is not None:
                    args[2] = args[2] + recipe.bias_delta
                source = self.acts.get(node.inputs[0])
                if source is not None and len(args) > 2 and args[2] is not None:
                    # the emitted bias is int32 on the grid s_x * s_w: at 4-bit activations its rounding alone
                    # moves outputs across levels, so the simulation rounds it the same way
                    step = source.log_scale.exp() * recipe.scale.reshape(-1)
                    args[2] = _RoundSTE.apply(args[2] / step) * step
            result = _OPS[node.op_type](node, args)
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results, strict=False):
                if not name:
                    continue
                if quantized and name in self.acts and name not in block.outputs:
                    value = self.acts[name](value, drop)
                env[name] = value
        return tuple(env[name] for name in block.outputs)

    def _lookup(self, graph: TorchGraph, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        if graph.is_constant(name):
            return graph.constant(name)
        return self.side[name]


def _side_values(graph: TorchGraph, x: torch.Tensor) -> tuple[set[str], dict[str, torch.Tensor]]:
    """One forward pass on a batch: which tensors are float activations, and the non-float ones (shape
    arithmetic), which depend on the batch size only and are reused as constants."""
    env: dict[str, torch.Tensor] = dict(zip(graph.input_names, (x,), strict=True))
    floats: set[str] = {graph.input_names[0]}
    side: dict[str, torch.Tensor] = {}
    for node in graph._nodes:
        args = [graph._lookup(env, name) if name else None for name in node.inputs]
        result = _OPS[node.op_type](node, args)
        results = result if isinstance(result, tuple) else (result,)
        for name, value in zip(node.outputs, results, strict=False):
            if name:
                env[name] = value
                (floats.add(name) if _is_float(value) else side.__setitem__(name, value))
    return floats, side


def _batches(count: int, batch: int) -> list[slice]:
    return [slice(start, start + batch) for start in range(0, count, batch)]


def reconstruct(fp_model: Any, quant_model: Any, samples: np.ndarray,
                weights: dict[str, WeightGrid], acts: dict[str, ActGrid], options: ReconstructOptions | None = None,
                progress: Callable[[int, int, str, int, int], None] | None = None) -> ReconstructResult:
    """Learn the roundings and activation step sizes of ``quant_model`` block by block.

    ``fp_model`` is the float graph the targets come from; ``quant_model`` the same graph (same nodes, in the
    same order) as the grids will be emitted on: its float weights are what the roundings round (DF-MPC's
    compensated layers, say) and its biases are used as they are (bias correction included). ``weights`` maps
    layer node names to their grids, ``acts`` quantized tensor names to theirs. ``progress(block, blocks, name,
    step, steps)`` follows the work.
    """
    options = options or ReconstructOptions()
    start_time = time.perf_counter()
    torch.manual_seed(options.seed)
    device = options.device
    fp, quant = TorchGraph(fp_model).to(device), TorchGraph(quant_model).to(device)
    if [n.op_type for n in fp._nodes] != [n.op_type for n in quant._nodes]:
        raise ValueError("reconstruction: the float and quantized graphs differ in their nodes")
    fp_nodes = dict(zip((n.name for n in quant._nodes), fp._nodes, strict=True))
    pixels = int(np.prod(samples.shape[2:])) if samples.ndim > 2 else 1
    wanted = options.batch_size or int(np.clip(BATCH_PIXELS // max(pixels, 1), 4, 32))
    batch = max(1, min(wanted, len(samples)))
    count = (len(samples) // batch) * batch
    x_all = torch.from_numpy(np.ascontiguousarray(samples[:count], dtype=np.float32))
    with torch.no_grad():
        floats, side = _side_values(quant, x_all[:batch].to(device))
    runner = _Runner(fp, quant, side)
    for name, grid in weights.items():
        node = next(n for n in quant._nodes if n.name == name)
        w = quant.constant(node.inputs[1]).detach().cpu().numpy()
        w = np.swapaxes(w, 0, 1) if grid.swap_axes else w
        runner.recipes[name] = _RoundRecipe(w.astype(np.float64), grid, device, options.start_slack)
    for name, grid in acts.items():
        runner.acts[name] = _ActQuant(grid, device)
    blocks = find_blocks(quant, floats, set(weights))
    result = ReconstructResult({}, {}, samples=count, compiled=options.compile)
    # the FP32 and quantized inputs of the current block, for every sample (kept on the CPU)
    held = (int(count * options.holdout) // batch) * batch if count >= 2 * batch else 0
    train = count - held
    judge = slice(train, count) if held else slice(0, count)  # the samples a block's loss is measured on
    fisher_start = time.perf_counter()
    fisher = (_fisher_weights(runner, blocks, fp_nodes, x_all, batch, device, options.fisher_draws, options.seed)
              if options.fisher_draws > 0 else {})
    result.fisher_seconds = time.perf_counter() - fisher_start
    fp_in = q_in = (x_all,)
    for index, block in enumerate(blocks):
        block_start = time.perf_counter()
        fp_list = [fp_nodes[n.name] for n in block.nodes]
        slices = _batches(count, batch)

        def run_all(values: tuple[torch.Tensor, ...], quantized: bool, block=block, fp_list=fp_list,
                    slices=slices) -> tuple[torch.Tensor, ...]:
            outs: list[list[torch.Tensor]] = [[] for _ in block.outputs]
            with torch.no_grad():
                for part in slices:
                    got = runner.run(block, tuple(_loaded(v[part], device) for v in values), quantized=quantized,
                                     fp_nodes=fp_list)
                    for store, value in zip(outs, got, strict=True):
                        store.append(_stored(value.cpu(), options.store_half))
            return tuple(torch.cat(store) for store in outs)

        fp_out = run_all(fp_in, False)
        for name in block.layers:
            runner.recipes[name].hard = True
        out_w = tuple(fisher.get(name) for name in block.outputs)
        loss_before = _mse(run_all(q_in, True), fp_out, judge, out_w)
        params_round = [runner.recipes[name].v for name in block.layers]
        acts_here = [name for name in _block_acts(block, runner.acts)]
        params_act = ([runner.acts[name].log_scale for name in acts_here if not runner.acts[name].fine]
                      if options.learn_act else [])
        params_bias = [runner.recipes[name].bias_delta for name in block.layers
                       if options.learn_bias and _has_bias(block, name)]
        learnable = params_round + params_act + params_bias
        saved = [p.detach().clone() for p in learnable]
        if options.steps > 0 and (params_round or params_act):
            for name in block.layers:
                runner.recipes[name].hard = False
            groups = []
            if params_round:
                groups.append({"params": params_round, "lr": options.lr_round})
            if params_act:
                groups.append({"params": params_act, "lr": options.lr_scale})
            if params_bias:
                groups.append({"params": params_bias, "lr": options.lr_bias})
            optimiser = torch.optim.Adam(groups)
            warm = int(options.warmup * options.steps)
            generator = torch.Generator().manual_seed(options.seed + index)

            def step_loss(values: tuple[torch.Tensor, ...], fp_values: tuple[torch.Tensor, ...] | None,
                          targets: tuple[torch.Tensor, ...], out_weights: tuple[torch.Tensor | None, ...],
                          beta: torch.Tensor | None, block=block) -> torch.Tensor:
                if fp_values is not None:  # QDrop's input mixing, inside the step so that compiling fuses it
                    values = tuple(torch.where(torch.rand_like(q) < options.input_mix, f, q)
                                   for q, f in zip(values, fp_values, strict=True))
                out = runner.run(block, values, quantized=True, drop=options.drop_prob)
                loss = sum(_channel_sum_mse(o, t, w) for o, t, w in zip(out, targets, out_weights, strict=True))
                if beta is not None:
                    loss = loss + options.round_weight * sum(runner.recipes[name].regulariser(beta)
                                                             for name in block.layers)
                return loss

            learn_step = _compiled(step_loss, device) if result.compiled else step_loss
            for step in range(options.steps):
                pick = torch.randint(0, train, (batch,), generator=generator)
                values = tuple(_loaded(v[pick], device) for v in q_in)
                fp_values = (tuple(_loaded(f[pick], device) for f in fp_in)
                             if options.input_mix > 0 and fp_in is not q_in else None)
                targets = tuple(_loaded(t[pick], device) for t in fp_out)
                beta = None
                if step >= warm and params_round:
                    progress_frac = (step - warm) / max(1, options.steps - warm)
                    # a tensor, so that the compiled step is not specialised on (recompiled for) each value
                    beta = torch.tensor(options.beta[0] + (options.beta[1] - options.beta[0]) * progress_frac,
                                        device=device)
                picked_w = tuple(None if w is None else w[pick].to(device) for w in out_w)
                try:
                    loss = learn_step(values, fp_values, targets, picked_w, beta)
                except Exception as error:  # noqa: BLE001 -- whatever the compiler raised, eager can go on
                    if learn_step is step_loss:
                        raise
                    result.compiled, result.compile_error = False, f"{type(error).__name__}: {error}"[:300]
                    logger.warning("reconstruct: torch.compile failed (%s); the steps run eager", result.compile_error)
                    learn_step = step_loss
                    loss = learn_step(values, fp_values, targets, picked_w, beta)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if progress is not None and (step % 50 == 0 or step == options.steps - 1):
                    progress(index, len(blocks), block.layers[0] if block.layers else "", step + 1, options.steps)
            for name in block.layers:
                runner.recipes[name].hard = True
        q_out = run_all(q_in, True)
        loss_after = _mse(q_out, fp_out, judge, out_w)
        if loss_after > loss_before:  # worse on the held-out samples (overfit, or QDrop's noise): keep the start
            with torch.no_grad():
                for param, value in zip(learnable, saved, strict=True):
                    param.copy_(value)
            q_out = run_all(q_in, True)
            loss_after = _mse(q_out, fp_out, judge, out_w)
        flipped = 0
        for name in block.layers:
            recipe = runner.recipes[name]
            ints = recipe.integers().detach().cpu().numpy().astype(np.int64)
            flipped += int((ints != recipe.start.cpu().numpy()).sum())
            result.w_int[name] = ints
            if options.learn_bias and _has_bias(block, name):
                node = next(n for n in block.nodes if n.name == name)
                result.biases[name] = (quant.constant(node.inputs[2]) + recipe.bias_delta).detach().cpu().numpy()
        result.blocks.append(BlockReport(f"block {index + 1}", list(block.layers), acts_here, loss_before,
                                         loss_after, flipped, time.perf_counter() - block_start))
        logger.info("reconstruct block %d/%d (%s): mse %.4g -> %.4g, %d flips", index + 1, len(blocks),
                    ", ".join(block.layers), loss_before, loss_after, flipped)
        fp_in, q_in = fp_out, q_out
    result.outputs = tuple(_loaded(value, "cpu").numpy() for value in q_in)
    result.act_scales = {name: act.scale for name, act in runner.acts.items()}
    result.seconds = time.perf_counter() - start_time
    return result


def _compiled(step: Callable, device: str) -> Callable:
    """``step`` under torch.compile, with the previous block's graphs dropped: every block's step is the same
    Python function over other nodes, and dynamo's per-function cache would otherwise fill up after a few blocks
    and fall back to eager without a word. The reset is process-wide: other functions a caller compiled in this
    process are compiled again on their next call."""
    torch._dynamo.reset()
    # inductor's channels-last layout for convs cost the CPU steps: ResNet-20 389 -> 520 ms, MobileNet-V1 331 -> 390
    options = {"layout_optimization": False, "triton.cudagraphs": device.startswith("cuda")}
    return torch.compile(step, dynamic=False, options=options)


def _has_bias(block: Block, layer: str) -> bool:
    node = next(n for n in block.nodes if n.name == layer)
    return len(node.inputs) > 2 and bool(node.inputs[2])


def _block_acts(block: Block, acts: dict[str, _ActQuant]) -> list[str]:
    """The activation grids a block applies: its inputs' and those of tensors it produces and reads itself."""
    names = [name for name in block.inputs if name in acts]
    names += [name for node in block.nodes for name in node.outputs
              if name in acts and name not in block.outputs and name not in names]
    return names


def _channel_sum_mse(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over samples and positions;
    ``weight`` [samples, channels] scales each sample's channels (the Fisher weighting)."""
    diff = _weighted((out - target).pow(2), weight)
    return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()


def _weighted(diff: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Squared errors scaled per sample and channel by ``weight`` [samples, channels] where it fits."""
    if weight is None or diff.dim() < 2 or weight.shape != diff.shape[:2]:
        return diff
    return diff * weight.reshape(weight.shape + (1,) * (diff.dim() - 2))


def _mse(outs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...], part: slice = slice(None),
         weights: tuple[torch.Tensor | None, ...] | None = None) -> float:
    weights = weights or (None,) * len(outs)
    total = 0.0
    for o, t, w in zip(outs, targets, weights, strict=True):
        diff = (_loaded(o[part], "cpu") - _loaded(t[part], "cpu")).pow(2)
        total += float(_weighted(diff, None if w is None else w[part]).mean())
    return total


def _fisher_weights(runner: _Runner, blocks: list[Block], fp_nodes: dict[str, NodeSpec], x_all: torch.Tensor,
                    batch: int, device: str, draws: int, seed: int) -> dict[str, torch.Tensor]:
    """Per block output: [samples, channels] mean over positions of (d log p(y) / d output)^2, y drawn from the
    FP32 prediction (the Fisher's diagonal, so no label is needed), normalised to mean 1 per output."""
    generator = torch.Generator().manual_seed(seed + 7919)
    sums: dict[str, list[torch.Tensor]] = {name: [] for block in blocks for name in block.outputs}
    for part in _batches(len(x_all), batch):
        x = x_all[part].to(device).requires_grad_(True)
        values: tuple[torch.Tensor, ...] = (x,)
        kept: list[tuple[str, torch.Tensor]] = []
        for block in blocks:
            values = runner.run(block, values, quantized=False, fp_nodes=[fp_nodes[n.name] for n in block.nodes])
            for name, value in zip(block.outputs, values, strict=True):
                if value.requires_grad:
                    value.retain_grad()
                    kept.append((name, value))
        final = values[0].reshape(values[0].shape[0], -1)
        ones = torch.ones(len(final), device=final.device)
        probs_given = bool((final >= 0).all()) and bool(torch.allclose(final.sum(1), ones, atol=1e-3))
        log_p = torch.log(final.clamp_min(1e-12)) if probs_given else torch.log_softmax(final, dim=1)
        acc = {name: torch.zeros(value.shape[:2]) for name, value in kept}
        for draw in range(draws):
            labels = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator).reshape(-1)
            for _, value in kept:
                value.grad = None
            log_p[torch.arange(len(labels)), labels.to(device)].sum().backward(retain_graph=draw < draws - 1)
            for name, value in kept:
                if value.grad is None:  # not on the path to the prediction (another graph output): stays plain
                    continue
                g = value.grad.detach().cpu().pow(2)
                acc[name] += g.reshape(g.shape[0], g.shape[1], -1).mean(2) if g.dim() > 2 else g
        for name, _ in kept:
            sums[name].append(acc[name] / draws)
    weights = {}
    for name, parts in sums.items():
        if parts:
            w = torch.cat(parts)
            if float(w.mean()) > 0:  # no gradient reached it at all: plain squared error
                weights[name] = w / w.mean()
    return weights


# float16's largest finite value is 65504: a tensor reaching past this keeps float32
_HALF_LIMIT = 6.0e4


def _stored(value: torch.Tensor, half: bool) -> torch.Tensor:
    """A held block input or target, in float16 when asked and its values fit (integer tensors untouched)."""
    if not half or not value.is_floating_point() or value.dtype != torch.float32:
        return value
    if value.numel() and float(value.abs().max()) > _HALF_LIMIT:
        return value
    return value.half()


def _loaded(value: torch.Tensor, device: str) -> torch.Tensor:
    return value.to(device, torch.float32) if value.dtype == torch.float16 else value.to(device)
