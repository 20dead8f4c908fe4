"""Which lane holds which element: the register layouts of ``mma.sync`` and ``ldmatrix``.

A tensor-core instruction is executed by a whole warp. Its operands are not arrays but
*fragments*: every one of the 32 lanes holds a few registers, and each register holds one
or two elements of the matrix at a position fixed by the PTX ISA ("Matrix Fragments for
mma.m16n8k16 with floating point type"). The tensor-core kernels (:mod:`.prefill_v3`), the
simulator's stand-ins for the instructions (:mod:`.mma`), the tests and tutorial 05's
pictures all use the functions below, so there is one statement of each layout.

Notation, for ``lane`` in ``0..31``: ``group = lane // 4`` (the "groupID", 0..7) and
``quad_lane = lane % 4`` (the "threadID_in_group", 0..3). The four lanes with the same
``group`` form a *quad*; they share the rows of the C fragment, which is why row
reductions in flash attention are two shuffles inside the quad (xor 1, xor 2).

``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32``: ``D = A @ B + C`` with

* ``A``: 16 x 16 (M x K), 16-bit, row-major: 4 registers of two elements = 8 per lane;
* ``B``: 16 x 8 (K x N), 16-bit, "col" (stored N-major, i.e. as ``B.T`` row-major, which is
  how a key tile ``K[key, dim]`` already lies for ``S = Q @ K.T``): 2 registers = 4 elements;
* ``C``, ``D``: 16 x 8 float32: 4 registers (one element each).

Element ``e`` of a lane's fragment is ``register e // 2``, ``half e % 2`` (the lower 16 bits
are the earlier element) for A and B, register ``e`` for C.

Nothing here imports numba: these are plain functions of integers, usable from numpy.
"""

from __future__ import annotations

import numpy as np

M, N, K = 16, 8, 16  #: the shape of one m16n8k16 instruction
WARP = 32


def a_coords(lane: int, e: int) -> tuple[int, int]:
    """``(row, col)`` in the 16 x 16 A tile of element ``e`` (0..7) held by ``lane``."""
    group, quad_lane = lane // 4, lane % 4
    row = group + 8 * ((e // 2) % 2)  # registers 1 and 3 hold rows 8..15
    col = 2 * quad_lane + (e % 2) + 8 * (e // 4)  # registers 2 and 3 hold cols 8..15
    return row, col


def b_coords(lane: int, e: int) -> tuple[int, int]:
    """``(k, n)`` in the 16 x 8 B tile of element ``e`` (0..3) held by ``lane``."""
    group, quad_lane = lane // 4, lane % 4
    return 2 * quad_lane + (e % 2) + 8 * (e // 2), group


def c_coords(lane: int, e: int) -> tuple[int, int]:
    """``(row, col)`` in the 16 x 8 C/D tile of element ``e`` (0..3) held by ``lane``."""
    group, quad_lane = lane // 4, lane % 4
    return group + 8 * (e // 2), 2 * quad_lane + (e % 2)


def ldmatrix_coords(lane: int, reg: int, half: int, trans: bool = False) -> tuple[int, int, int]:
    """``(matrix, row, col)`` that ``ldmatrix...x4`` delivers to ``lane``'s ``reg``/``half``.

    ``ldmatrix.sync.aligned.m8n8.x4.shared.b16`` loads four 8 x 8 matrices of 16-bit
    elements from shared memory; lanes ``8j .. 8j+7`` supply the addresses of the eight rows
    of matrix ``j`` (each row is 16 contiguous bytes). Register ``j`` of every lane receives
    two elements of matrix ``j``: row ``group``, cols ``2*quad_lane + half`` -- or, with
    ``.trans``, the transposed matrix: row ``2*quad_lane + half``, col ``group``."""
    group, quad_lane = lane // 4, lane % 4
    if trans:
        return reg, 2 * quad_lane + half, group
    return reg, group, 2 * quad_lane + half


def ldmatrix_row_of_lane(lane: int) -> tuple[int, int]:
    """``(matrix, row)`` whose address ``lane`` supplies to ``ldmatrix...x4``."""
    return lane // 8, lane % 8


# -- how the kernels address their tiles ----------------------------------------------------
# Each function answers: for an ldmatrix.x4 that fills a fragment, which (row, col) of the
# tile in shared memory must this lane point at? They are what makes the four 8 x 8 matrices
# land in the registers the mma expects.


def a_tile_address(lane: int) -> tuple[int, int]:
    """Row/col offset, inside a 16 x 16 A block, of the row address ``lane`` gives to
    ``ldmatrix.x4`` so that the four registers are A's registers 0..3: matrix 0 = rows 0-7
    cols 0-7, matrix 1 = rows 8-15 cols 0-7, matrix 2 = rows 0-7 cols 8-15, matrix 3 =
    rows 8-15 cols 8-15."""
    return lane % 16, 8 * (lane // 16)


def b_pair_address(lane: int) -> tuple[int, int]:
    """Row/col offset inside a 16 (n) x 16 (k) block of an N-major B operand (a key tile
    ``K[key, dim]``) for ``ldmatrix.x4`` (no ``.trans``): registers 0, 1 are the B fragment
    of the n-tile ``0..7`` (k ``0..7`` and ``8..15``), registers 2, 3 that of ``8..15``."""
    j = lane // 8
    return (lane % 8) + 8 * (j // 2), 8 * (j % 2)


def bt_pair_address(lane: int) -> tuple[int, int]:
    """Row/col offset inside a 16 (k) x 16 (n) block of a K-major B operand (a value tile
    ``V[key, dim]``) for ``ldmatrix.x4.trans``: registers 0, 1 are the B fragment of the
    n-tile ``0..7`` (k ``0..7``, ``8..15``), registers 2, 3 that of ``8..15``."""
    j = lane // 8
    return (lane % 8) + 8 * (j % 2), 8 * (j // 2)


# -- numpy emulation: the whole warp at once --------------------------------------------------


def a_fragments(a: np.ndarray) -> np.ndarray:
    """The ``(32, 8)`` per-lane elements of a 16 x 16 A tile (as :func:`a_coords`)."""
    return np.array([[a[a_coords(ln, e)] for e in range(8)] for ln in range(WARP)], a.dtype)


def b_fragments(b: np.ndarray) -> np.ndarray:
    """The ``(32, 4)`` per-lane elements of a 16 x 8 (K x N) B tile."""
    return np.array([[b[b_coords(ln, e)] for e in range(4)] for ln in range(WARP)], b.dtype)


def c_fragments(c: np.ndarray) -> np.ndarray:
    """The ``(32, 4)`` per-lane elements of a 16 x 8 C tile."""
    return np.array([[c[c_coords(ln, e)] for e in range(4)] for ln in range(WARP)], c.dtype)


def c_from_fragments(frags: np.ndarray) -> np.ndarray:
    """The 16 x 8 tile from ``(32, 4)`` per-lane C/D elements (inverse of
    :func:`c_fragments`)."""
    c = np.empty((M, N), frags.dtype)
    for ln in range(WARP):
        for e in range(4):
            c[c_coords(ln, e)] = frags[ln, e]
    return c


def mma_emulate(a_frag: np.ndarray, b_frag: np.ndarray, c_frag: np.ndarray) -> np.ndarray:
    """What ``mma.sync.m16n8k16`` computes, lane by lane: ``(32, 4)`` D fragments from
    ``(32, 8)`` A, ``(32, 4)`` B and ``(32, 4)`` C fragments (products in float32, as the
    tensor cores accumulate)."""
    a = np.zeros((M, K), np.float32)
    b = np.zeros((K, N), np.float32)
    for ln in range(WARP):
        for e in range(8):
            a[a_coords(ln, e)] = a_frag[ln, e]
        for e in range(4):
            b[b_coords(ln, e)] = b_frag[ln, e]
    d = a @ b + c_from_fragments(np.asarray(c_frag, np.float32))
    return c_fragments(d)


def ldmatrix_emulate(smem: np.ndarray, row_addr: list[int], trans: bool = False) -> np.ndarray:
    """What ``ldmatrix.x4[.trans]`` delivers: ``(32, 4, 2)`` (lane, register, half) from a
    flat 16-bit ``smem`` and the element index each lane supplies (``row_addr[lane]``, the
    first of 8 contiguous elements of one matrix row)."""
    out = np.empty((WARP, 4, 2), smem.dtype)
    for ln in range(WARP):
        for reg in range(4):
            for half in range(2):
                mat, r, c = ldmatrix_coords(ln, reg, half, trans)
                out[ln, reg, half] = smem[row_addr[8 * mat + r] + c]
    return out


def p_as_a_operand(c_even: int, c_odd: int) -> list[tuple[int, int]]:
    """How the S accumulators become the A operand of ``P @ V`` without leaving registers.

    For a k-step of 16 keys, A's registers 0..3 are the C elements ``(0, 1)``, ``(2, 3)`` of
    the even n-tile (keys ``0..7`` of the step) and then ``(0, 1)``, ``(2, 3)`` of the odd
    n-tile (keys ``8..15``), each pair packed into one 16-bit x 2 register. Returns that
    recipe as ``(n-tile, first C element)`` per A register."""
    return [(c_even, 0), (c_even, 2), (c_odd, 0), (c_odd, 2)]
