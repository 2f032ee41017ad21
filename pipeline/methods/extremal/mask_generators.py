"""The smooth masks of extremal perturbations: parameters on a coarse grid, combined per pixel
by a smooth max of kernel-weighted neighbours (the formula is in the docstring of
pipeline/methods/extremal/optimizer.py). Two generators make the same masks:

- `MaskGenerator`, the reference: TorchRay's MaskGenerator's operation order, so its masks are
  bitwise TorchRay's (tests/test_extremal_torchray.py);
- `FastMaskGenerator`, the fast path's: equal to float32 rounding (about 1e-6), 3-4× faster
  on the CPU, and without the reference's per-pixel tap tensor (see its docstring).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- mask generator
def grid_shape(size: tuple[int, int], step: int) -> tuple[int, int]:
    """The parameter grid (h, w) = (⌈H/step⌉, ⌈W/step⌉) for images of size (H, W)."""
    return math.ceil(size[0] / step), math.ceil(size[1] / step)


def mask_kernel(distance: torch.Tensor, sigma: float) -> torch.Tensor:
    """The published smooth-mask kernel: 1 within σ/2, then exp(−2 (d/σ − 1/2)²)."""
    return torch.exp(-2 * ((distance / sigma - 0.5).clamp(min=0) ** 2))


def _axis_taps(cells: int, step: int, sigma: float, margin: float) -> tuple[int, tuple]:
    """The geometry of one axis of the extended mask (TorchRay's MaskGenerator).

    Returns the extended length E and, for each extended pixel u < E, the indices of its
    2R + 1 taps into the grid zero-padded by `pad` cells (E × K, long) and the signed pixel
    distances to the taps' centres (E × K, float32). Tap k of pixel u is grid point
    i = ⌊u/step⌋ + k − pad, centred at pixel margin + step·i of the extended mask, i.e. at
    step·i of the image; ⌊u/step⌋ is computed as floor(u · (M / (step·M))) in float32, the
    nearest-neighbour index that TorchRay's upsampling uses.
    """
    pad = 1 + math.ceil((margin + sigma) / step)
    radius = 1 + math.ceil(sigma / step)
    middle = cells + 2 * pad - 2 * radius
    extended = step * middle - step + 1
    inverse_step = torch.tensor(middle, dtype=torch.float32) / torch.tensor(
        step * middle, dtype=torch.float32
    )
    pixels = torch.arange(extended, dtype=torch.float32)
    cell = torch.floor(inverse_step * pixels)
    taps = torch.arange(2 * radius + 1, dtype=torch.float32)
    padded_index = cell[:, None] + taps[None, :]  # index into the padded grid
    distance = pixels[:, None] - (margin + step * (padded_index - pad))
    return extended, (padded_index.long(), distance, pad)


class MaskGenerator:
    """Turns grid parameters N×h×w into smooth masks (see the module docstring).

    As TorchRay's MaskGenerator, the mask is built on an extended canvas with a margin of
    `margin` pixels (σ by default) around the image: E = step·(h + 2·pad − 2R) − step + 1
    pixels per side (260 at 224², step 7, σ 21), pad = 1 + ⌈(margin + σ)/step⌉,
    R = 1 + ⌈σ/step⌉. Pixel u combines the (2R + 1)² grid points i = ⌊u/step⌋ + k − pad;
    grid points outside the parameter grid count as 0. The call returns the extended mask,
    clamped to [0, 1]; `crop` cuts the image's H×W window out of it. The area loss sorts the
    whole extended mask.

    Memory: N·E²·(2R + 1)² floats per intermediate (81 taps at step 7, σ 21: 22 MB per mask
    at 224²); autograd keeps about three of them per mask.
    """

    def __init__(
        self,
        size: tuple[int, int],
        step: int,
        sigma: float,
        temperature: float,
        device,
        margin: float | None = None,
    ):
        rows, dy, cols, dx = self._set_geometry(size, step, sigma, temperature, margin)
        height, width = self.extended
        # tap-major index lists: row index of (ky, y) at ky·E + y, column index of (kx, x)
        self.rows = rows.t().flatten().to(device)
        self.cols = cols.t().flatten().to(device)
        distance = torch.sqrt(dy.t()[:, None, :, None] ** 2 + dx.t()[None, :, None, :] ** 2)
        kernel = mask_kernel(distance, sigma)  # K×K×E×E'
        self.weight = kernel.reshape(self.taps**2, height, width).to(device)

    def _set_geometry(
        self,
        size: tuple[int, int],
        step: int,
        sigma: float,
        temperature: float,
        margin: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Set size, grid, temperature, offset, pad, extended and taps; return each axis's tap
        indices and distances (_axis_taps): rows, dy, cols, dx."""
        margin = sigma if margin is None else margin
        self.size = size
        self.grid = grid_shape(size, step)
        self.temperature = temperature
        self.offset = round(margin)
        height, (rows, dy, self.pad) = _axis_taps(self.grid[0], step, sigma, margin)
        width, (cols, dx, _) = _axis_taps(self.grid[1], step, sigma, margin)
        self.extended = (height, width)
        self.taps = rows.shape[1]
        return rows, dy, cols, dx

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        """params N×h×w in [0, 1] -> extended masks N×E×E' in [0, 1].

        One mask at a time: its N·K²·E·E' intermediates (22 MB per mask at 224²) then stay
        in cache; on the 2-core CPU 4 masks at once took 20× one mask's time, not 4×.
        """
        return torch.cat([self._generate(one) for one in params.split(1)])

    def _generate(self, params: torch.Tensor) -> torch.Tensor:
        count = params.shape[0]
        height, width = self.extended
        taps = self.taps
        padded = F.pad(params, (self.pad,) * 4)
        # values[n, ky·K + kx, y, x] = padded[n, rows[y, ky], cols[x, kx]], laid out as
        # TorchRay's unfolded tensor so the softmax and the sum round as there (bitwise equal
        # masks keep the area loss's sort order, and so its gradient, equal)
        values = padded.index_select(1, self.rows).index_select(2, self.cols)
        values = values.view(count, taps, height, taps, width).transpose(2, 3)
        values = values.reshape(count, taps * taps, height, width) * self.weight
        if self.temperature <= 0:
            masks = values.amax(dim=1)
        else:
            # smooth max Σ v·softmax(v/T) over the taps (TorchRay: coldness 1/T = 20)
            masks = (values * F.softmax((1.0 / self.temperature) * values, dim=1)).sum(dim=1)
        return masks.clamp(0, 1)

    def crop(self, extended: torch.Tensor) -> torch.Tensor:
        """The image's window N×H×W of extended masks N×E×E'."""
        top = self.offset
        return extended[..., top : top + self.size[0], top : top + self.size[1]]


# ----------------------------------------------------------------------------- fast generator
class FastMaskGenerator(MaskGenerator):
    """MaskGenerator's masks (same attributes, `__call__` and `crop`), computed per offset.

    The masks equal MaskGenerator's to float32 rounding (about 1e-6), computed in an order that
    never holds the N × K² × E × E' tensor of every pixel's taps.

    The reference generator gathers, for every pixel u of the extended canvas, its K² = (2R + 1)²
    grid parameters, weights them by the kernel and takes their smooth max: 81 taps × 260² pixels
    per mask at 224² (22 MB per intermediate, about ten passes over it forward and backward). It
    took 67% of an extremal step on the CPU (benchmarks/results/profile_extremal_cpu.csv).

    Two facts make a cheaper order possible:

    - a pixel's K² taps depend only on its cell c = ⌊u/step⌋ (they are the parameters around c);
    - its K² kernel weights depend only on its offset o = u − step·c inside the cell.

    So the taps of every cell are one unfold of the padded grid, P: N × K² × M × M' (M cells per
    side), and for each of the step² offsets the masks at that offset in every cell are

        m_o = smax_k (w[o, k] · P[:, k])        a reduction over K², contiguous, N × M × M'.

    The smooth max Σ v·softmax(v/T) is written as Σ v·e / Σ e with e = exp((v − max_k v)/T).

    The backward pass recomputes v and e offset by offset instead of storing them (memory: the
    masks, their denominators and P, a few MB per mask instead of the reference's ~66 MB), with

        ∂m/∂v_k = e_k / Σe · (1 + (v_k − m)/T).

    Where the geometry does not allow it (TorchRay's float32 floor giving a cell other than
    ⌊u/step⌋, or T = 0, a hard max), the reference generator runs instead.

    offsets_per_pass: how many of the step² offsets one pass computes; each pass holds
    N × offsets_per_pass × K² × M × M' floats (1 on the CPU keeps a pass in cache; more means
    fewer, larger kernels on a GPU). Default: 1 on the CPU, 7 elsewhere.
    """

    def __init__(
        self,
        size: tuple[int, int],
        step: int,
        sigma: float,
        temperature: float,
        device,
        margin: float | None = None,
        offsets_per_pass: int | None = None,
    ):
        rows, dy, cols, dx = self._set_geometry(size, step, sigma, temperature, margin)
        self.step = step
        device = torch.device(device)
        if offsets_per_pass is None:
            offsets_per_pass = 1 if device.type == "cpu" else 7
        self.offsets_per_pass = max(1, offsets_per_pass)
        # cells per side: the last extended pixel's cell + 1
        self.cells = int(rows[-1, 0]) + 1, int(cols[-1, 0]) + 1
        self._reference: MaskGenerator | None = None
        if temperature <= 0 or not (
            _cells_are_floors(rows[:, 0], step) and _cells_are_floors(cols[:, 0], step)
        ):
            self._reference = MaskGenerator(size, step, sigma, temperature, device, margin)
            return
        # weights per offset (oy·step + ox) and tap (ky·K + kx), from the first cell's pixels:
        # every cell's distances are the same (u − step·c is the offset)
        rows_by_offset, cols_by_offset = dy[:step].t(), dx[:step].t()  # K × step each
        distance = torch.sqrt(
            rows_by_offset[:, None, :, None] ** 2 + cols_by_offset[None, :, None, :] ** 2
        )
        kernel = mask_kernel(distance, sigma)  # ky × kx × oy × ox
        self.offset_weights = kernel.reshape(self.taps**2, step * step).t().contiguous().to(device)

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        """params N×h×w in [0, 1] -> extended masks N×E×E' in [0, 1]."""
        if self._reference is not None:
            return self._reference(params)
        count = params.shape[0]
        rows, cols = self.cells
        padded = F.pad(params[:, None], (self.pad,) * 4)
        taps = F.unfold(padded, self.taps).view(count, self.taps**2, rows, cols)
        per_offset = _SmoothMaxOverTaps.apply(
            taps, self.offset_weights, 1.0 / self.temperature, self.offsets_per_pass
        )  # N × step² × M × M'
        step = self.step
        masks = per_offset.view(count, step, step, rows, cols).permute(0, 3, 1, 4, 2)
        masks = masks.reshape(count, rows * step, cols * step)
        height, width = self.extended
        return masks[:, :height, :width].clamp(0, 1)


def _cells_are_floors(cells: torch.Tensor, step: int) -> bool:
    """True when TorchRay's float32 cell index of every pixel u is ⌊u/step⌋."""
    return torch.equal(cells, torch.arange(len(cells)) // step)


def _exponentials(values: torch.Tensor, inverse_temperature: float) -> torch.Tensor:
    """exp((v − max_k v)/T) for v N×O×K²×M×M' (the max over the taps, axis 2)."""
    scaled = values * inverse_temperature
    return scaled.sub_(scaled.amax(dim=2, keepdim=True)).exp_()


class _SmoothMaxOverTaps(torch.autograd.Function):
    """taps N×K²×M×M', weights O×K² (offset, tap) -> N×O×M×M', the smooth max over the taps
    of weights[o, k]·taps[:, k] at temperature 1/inverse_temperature."""

    @staticmethod
    def forward(ctx, taps, weights, inverse_temperature, offsets_per_pass):
        count, _, rows, cols = taps.shape
        masks = taps.new_empty(count, weights.shape[0], rows, cols)
        sums = torch.empty_like(masks)
        for start in range(0, weights.shape[0], offsets_per_pass):
            chunk = slice(start, start + offsets_per_pass)
            values = taps[:, None] * weights[chunk, :, None, None]  # N × O × K² × M × M'
            exponentials = _exponentials(values, inverse_temperature)
            sums[:, chunk] = exponentials.sum(dim=2)
            masks[:, chunk] = (values * exponentials).sum(dim=2) / sums[:, chunk]
        ctx.save_for_backward(taps, weights, masks, sums)
        ctx.inverse_temperature = inverse_temperature
        ctx.offsets_per_pass = offsets_per_pass
        return masks

    @staticmethod
    def backward(ctx, grad):
        taps, weights, masks, sums = ctx.saved_tensors
        inverse_temperature = ctx.inverse_temperature
        grad_taps = torch.zeros_like(taps)
        grad_per_sum = grad / sums
        for start in range(0, weights.shape[0], ctx.offsets_per_pass):
            chunk = slice(start, start + ctx.offsets_per_pass)
            chunk_weights = weights[chunk, :, None, None]
            values = taps[:, None] * chunk_weights
            exponentials = _exponentials(values, inverse_temperature)
            # ∂L/∂v_k = g/Σe · e_k · (1 + (v_k − m)/T); ∂v_k/∂taps_k = w[o, k]
            term = (values - masks[:, chunk, None]).mul_(inverse_temperature).add_(1)
            term.mul_(exponentials).mul_(grad_per_sum[:, chunk, None])
            grad_taps += (term * chunk_weights).sum(dim=1)
        return grad_taps, None, None, None
