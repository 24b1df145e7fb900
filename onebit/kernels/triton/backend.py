"""`TritonCudaBackend`: the Backend protocol on torch tensors with the Triton kernels of kernels.py, plus a fused,
CUDA-graph-captured decode step.

Two paths:
- the protocol (prefill, perplexity, anything with more than one new token per sequence): each op is a kernel;
  ``rmsnorm`` returns a lazy ``Normed`` that the next matmul fuses into its prologue (with the int8
  quantization), so a ternary linear is one kernel for one token (``kernels.PROLOGUE_*``: a gemv of many
  programs, 2-4 tokens and more go through a norm + quantization kernel first; more than ``GEMV_MAX_TOKENS``
  then take a tensor-core GEMM: ``kernels.FEW_*`` for 17-32 tokens, from 5 for a matrix of 4096 inputs or more);
- ``decode_batch`` (every sequence adds one token): at one token six kernels per layer (q/k/v matmul with
  RMSNorm + quantization prologue and RoPE + KV-append epilogue; split-KV attention; merge; o matmul with
  sub-norm + quantization prologue and residual epilogue, whose last program also normalizes and quantizes the
  residual rows for gate/up (``kernels.FOLD_NORM``; one sequence: ``FOLD_MAX_TOKENS``); the gate/up matmul
  on int8 with the gated activation; down matmul with sub-norm + quantization prologue and residual epilogue),
  replayed from a CUDA graph captured once per (model, batch bucket, attention class), each kernel launched while
  the previous one runs (programmatic dependent launch, ``kernels.PDL``). Sequences find their KV caches through a
  table of addresses in the graph's static inputs, so any mix of sequences and lengths replays the same graph of
  its class: five kernels a layer when every context is at most ``kernels.ATTN_SHORT_MAX`` positions (one
  attention kernel takes each whole, no merge), six otherwise.

Not one persistent kernel (measured on an H200, bitnet-2b4t shapes, one sequence): all layers in one kernel of
one program per SM, its phases ordered by counters (a release add after each unit's stores, consumers spinning
until the count they need; weight tiles loaded before each wait) took 1695 / 2934 us per step at 64 / 1024
tokens of context against the graph's 1051 / 1247. Each phase's chain (activation load, two reductions, the dot
product, the epilogue's loads and stores, then the release) lasted as long as the kernel it replaced, and the
counters' waits came on top; spinning on plain loads instead of atomics let the compiler move the data loads
before the wait (wrong results). Nor a tensor-core-free ``tl.dot`` in split-KV attention (float32 "ieee"):
1127 / 1976 / 3968 us at 64 / 1024 / 4096 tokens against 1049 / 1245 / 1707 with the CUDA-core broadcasts.
Nor the last split of each (sequence, kv head) merging the partials in the attention kernel (a counter like
FOLD_NORM's, no merge kernel): 1284 / 1543 us at 64 / 1024 against 1054 / 1249, as that program's four serial
merges (each two cross-warp reductions and a load from L2) outlast the merge kernel's 20 parallel programs. Nor
the gemv's whole tile cut into two power-of-two parts (320 words as 256 + 64, not 512 with 192 of padding): a
step took 1053 / 1248 us against 1054 / 1249, so the padding's arithmetic is off the critical path. Nor decode
attention reading its first block's cached rows older than the newest before its wait (no kernel of the step
writes them; the newest row added after it): 1033 / 1382 us at 64 / 1024 tokens against 1054 / 1248, a gain at
64 tokens (20 programs) and a loss at 1024 (320 programs whose early reads run beside the q/k/v gemv's).

Where a gemv's time goes (H200, 64 tokens, per-program %globaltimer / %clock64 stamps, medians): the wait for the
producer ends 0.3-1.0 us after its last program; the prologue (x row from L2 + sum of squares 0.8-1.0 us, norm +
absmax 0.4-0.5, quantize + store 0.3-0.55) ~1.6-1.9 us; the dot 0.6-1.0 us per pass of 2 slots (4 passes; each stamp
there adds a cross-warp max, so these overstate) and ~0.6-0.9 for the reduction; o's folded norm (its last program)
2.4 us. A chain of short dependent phases, then. Two tries at it, both slower: the tile in two parts again, with the
slot loop (1025 / 1220 us at 64 / 1024 against 990 / 1185: the second part's loop adds its own round trips), and the
prologue storing its int8 row in the tile's word order so the dot reads each word's 8 inputs as two int32 in one
round trip: 1886 / 2109 us, as every program's scattered byte stores hit the same scratch lines; with a scratch row
per program 1043 / 1243 (the dot then holds 250-255 registers) against 989 / 1185. A scratch row per program with
the present order: 988 / 1183, no gain. Nor 16 warps for the q/k/v, o and down gemvs (97-128 registers, half the
tile per thread): 1046 / 1191 us with 2 slots per pass, 1061 / 1203 with 1, 1072 / 1214 with 4, against 990 / 1185
with 8 warps (the baseline run before and after them; H200). Nor tiles of 8 pairs (twice the programs, the same
8 warps; every decode test passed on them): o 1020 / 1216 us, o and q/k/v 1051 / 1205, gate/up 1032 / 1222, down
(182 registers: one program per SM, 160 programs) 1017 / 1209, against 989 / 1184. More programs, or more warps per
program, each add a prologue's worth of reductions; the dot is not what they shorten.

Four more that lost (H200, decode step at 64 / 1024 tokens of context, variants alternating in one device run):
attention's merge folded into the o gemv's prologue (each o program merges the splits that hold positions, one
after another, in its row layout; no merge kernel for contexts of <= 8 splits; logits bit-identical to the merge
kernel's): 1087 us at 64 against 1005, as o then holds 180 registers and waits on 2 x 5 dependent L2 loads at 64
tokens, longer than the merge kernel it replaces. A cap of 128 registers for gate/up (4 programs per SM, not 3, so
its 432 programs fit one wave): 1004 / 1338 against 1005 / 1340. The next layer's weights read into L2 by a side
stream of the graph (evict_last loads, 16-512 KB per program): 1008-4895 us against 989, and with the side stream
quick enough the gemvs took as long as before (gate/up 6.14 us a call), so their time is not DRAM reads. The int8
input row loaded once into L1 before the slot passes (a 16-byte vector a thread): 1006 / 1202 against 989 / 1184,
so neither is each pass's own L2 round trip for its input bytes.

What the 991 us of a step at 64 tokens are made of (timing-only builds of the same run, wrong outputs): without
the gemvs' slot loop (the reduction still over the loaded tile) 734 us, so the dot products' integer work is
~2.1 us of each of the 120 gemvs; without the fused norm + quantization prologue as well 609 us (~1.4 us of each
of the 90 gemvs that have one); without o's folded norm as well 555 us (~1.8 us a layer). The 555 us left (183
kernels' hand-offs, tile loads and reductions, attention, merge, the 79 us lm_head) alone are 37% of the
roofline, so 35% (~590 us) needs fewer dependent kernels per layer as well as a cheaper dot, not either alone.
The whole-tile dot pads q/k/v, o and gate/up's 320 words a pair to 512 (37.5% of its integer work on padding).

Two more that did not pay (H200, same run): the tile as five chunks of 64 words (no padding: 37.5% less integer
work for q/k/v, o and gate/up; every input loaded in one round trip, in the tile rows' layout): 988.7 / 1180.7 us at
64 / 1024 tokens against 989.3 / 1183.7, so the padding's arithmetic is indeed off the critical path; with the
norm + quantization prologue in registers as well (no scratch row, no barrier): 1060 / 1205, as Triton then loads
and normalizes the row twice (once in the tile rows' layout, once in its reductions' own) and q/k/v and o hold 255
registers, so the kernels launched early beside them (attention: 5.9 us a call, not 4.2) find no room on their SMs.
That room is what ``kernels.GEMV_WIDE_MAXNREG`` buys the down gemv (981 / 1177 us against 990 / 1186).

Where the dot's time goes (Triton 3.6, sm_90 SASS of the q/k/v gemv): each slot's int8 inputs are loaded in a 1-D
layout, two bytes a thread, and moved into the tile's row layout through shared memory: a store, two barriers and
two loads per slot, eight times a gemv, as the tile's layout gives a word row to 4 threads (a 16-byte vector of 4 of
its 16 pairs each) and the inputs' layout gives it to one. Loading the inputs as a [words, pairs] tensor does not
help (the compiler gives that load a layout of its own and converts it the same way). The tile as [words, 4
sub-tiles, 4 pairs] (one 16-byte vector a word row and sub-tile, the threads along the words) with the input
pointers said to be non-contiguous (``tl.max_contiguous(.., 1)``, one byte a lane) does take the inputs straight
into the products' layout: no shared memory or barrier in the slot loop. Compiled for sm_90
(benchmarks/gpu_registers.py) it held 198 / 255 registers in q/k/v / o (120 / 128 now; o spilled, down's spills grew
from 128 to 360 bytes), and the reduction over words then crosses 32 lanes for 32 values a thread (160 shuffles,
against 24). Timed (H200, 64 / 1024 tokens of context, alternating with the code as it is, 980 / 1175 us): in
q/k/v alone 1052 / 1199, q/k/v and gate/up 1137 / 1282, every gemv 1207 / 1349 (gate/up then 8.6 us a call, down
7.8, o 7.4), so the exchanges it removes cost less than its shuffles and registers. The tile laid out as [sub-tiles,
words, pairs] instead (lanes along the sub-tiles as well: a reduction over 8 lanes, 120 registers) takes the
exchange back: its inputs' layout replicates each word over 4 lanes, which a 1-D load cannot give, and loading them
in the tile's 3-D shape gives the products a layout of the load's choosing, converted every slot.

Three more that lost (H200, decode step, variants alternating in one device run):
- One split at short contexts (a graph per context class; no merge kernel: the split kernel writes the output):
  one program per (sequence, kv head, 1 / 2 / 4 query heads), 16 / 32 / 64 positions a step, took 1115-1343 us at
  64 tokens against 981, 1312-1690 at 128 against 989-1013 and 1706-2383 at 256 against 1032-1035: the one
  program's blocks run one after another (10.9 us a call at 64 tokens, where 4 splits and the merge take ~6).
- Two to four sequences: the fused prologue normalizing the rows as one [rows, K] block (no norm_quant kernel
  first; PROLOGUE_MAX_TOKENS 4) took 1575 / 2545 us for 2 / 4 sequences against 1646 / 2592, but its per-row
  sums are not norm_quant's bits (another reduction layout), which batched decoding equal to decoding alone
  needs; with the o gemv's folded norm for them as well 1601 / 2627; the whole-tile dot taking two tokens a
  pass (one shift and mask of the tile for both, one reduction for four outputs) 1692 / 2764 alone (1561 / 2597
  with the other two, 2 slots a pass): a thread then holds three tiles' worth of registers (q/k/v 163-178,
  gate/up 128-154: one or two programs an SM, against three).
- The attention's programs per SM and register cap: see ``kernels.ATTN_PROGRAMS_PER_SM``.
- Decode attention asking for the next block's rows before the current block's arithmetic (two blocks in
  registers): 974 / 1169 / 1592 us at 64 / 1024 / 4096 tokens against 978 / 1173 / 1621; with fewer, longer splits
  (one program an SM) 975 / 1314 / 2249. What a long split costs is each block's arithmetic, not its loads: the
  layout exchanges and cross-warp sums of one softmax state, which ``kernels.ATTN_WARP_STATES`` removes instead.
  Triton's own pipelining (num_stages) leaves these loads alone (their addresses come from a table: no cp.async).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import UnsupportedError
from ...models.base import Segment
from ...weights.packing import TernaryWeight
from ..numpy_ref import quantize_rows_int8, rope_tables
from . import kernels as K

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # decode batch sizes with a captured graph (more run in chunks of 64)


class CudaKVCache:
    """One sequence's keys and values: [layers, 2, max_len, Hkv, D] (float16 or float32) on the device."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype, device):
        self.kv = torch.zeros((n_layers, 2, max_len, n_kv_heads, head_dim), dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def k(self) -> torch.Tensor:  # [layers, max_len, Hkv, D] views (cache.copy_prefix copies through them)
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    def trim(self, n: int) -> None:
        self.length = min(self.length, max(0, n))

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class CudaDense:
    """A float matrix [out, in] (embedding / lm_head) in 16 bits when exact, its int8 per-row copy on demand."""

    table: torch.Tensor
    matrix: K.Matrix
    int8: K.Matrix | None = None


@dataclass
class Normed:
    """RMSNorm(x) not yet computed: the next matmul fuses it (and the int8 quantization) into its prologue."""

    x: torch.Tensor
    weight: torch.Tensor
    eps: float

    def __getitem__(self, rows) -> "Normed":  # RMSNorm is per row: selecting rows commutes with it
        return Normed(self.x[torch.as_tensor(rows, device=self.x.device)], self.weight, self.eps)


@dataclass
class LayerPlan:
    """What the fused decode step needs of one decoder layer (BitNet or LLaMA)."""

    in_norm: torch.Tensor
    qkv: K.Matrix
    attn_sub_norm: torch.Tensor | None
    o: K.Matrix
    post_norm: torch.Tensor
    gate_up: K.Matrix
    ffn_sub_norm: torch.Tensor | None
    down: K.Matrix
    act: int


class TritonCudaBackend:
    name = "cuda"

    def __init__(self, lm_head: str = "f16", kv_dtype: str = "f32", graphs: bool = True, device=None):
        if lm_head not in ("f16", "int8"):
            raise ValueError(f"lm_head must be 'f16' or 'int8', got {lm_head!r}")
        if kv_dtype not in ("f32", "f16"):
            raise ValueError(f"kv_dtype must be 'f32' or 'f16', got {kv_dtype!r}")
        self.device = torch.device(device or "cuda")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError("the cuda backend needs a GPU that torch can see")
        self.lm_head, self.kv_dtype = lm_head, kv_dtype
        self.graphs = graphs and self.device.type == "cuda"
        self._rope: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._plans: dict[int, object] = {}
        self._steps: dict[tuple[int, int], "DecodeStep"] = {}

    def __repr__(self) -> str:
        return f"TritonCudaBackend(device={self.device}, lm_head={self.lm_head!r}, kv_dtype={self.kv_dtype!r})"

    # -- load time ---------------------------------------------------------------------------------
    def prepare_ternary(self, w: TernaryWeight) -> K.Matrix:
        """Repack into the kernels' paired-row words (``K.TernaryLayout``), packed on the device."""
        codes = self._put((w.ternary() + 1).astype(np.int8))
        scales = np.ascontiguousarray(np.repeat(w.scales, w.row_group, axis=0).T)  # [C, N]
        return K.Matrix.ternary(codes, self._put(scales), groups=w.scales.shape[1])

    def prepare_dense(self, w: np.ndarray):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim == 1:
            return self._put(w)
        t = torch.from_numpy(np.ascontiguousarray(w))
        for dt in (torch.bfloat16, torch.float16):
            c = t.to(dt)
            if torch.equal(c.to(torch.float32), t):
                t = c
                break
        t = t.to(self.device)
        ones = torch.ones((1, w.shape[0]), dtype=torch.float32, device=self.device)
        return CudaDense(t, K.Matrix(K.W_FLOAT, t, ones, w.shape[0], w.shape[1]))

    def make_cache(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int) -> CudaKVCache:
        dtype = torch.float16 if self.kv_dtype == "f16" else torch.float32
        return CudaKVCache(n_layers, n_kv_heads, head_dim, max_len, dtype, self.device)

    def _put(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _int8_head(self, w: CudaDense) -> K.Matrix:
        if w.int8 is None:
            rows = w.table.shape[0]
            q = torch.empty(w.table.shape, dtype=torch.int8, device=self.device)
            s = torch.empty((1, rows), dtype=torch.float32, device=self.device)
            for lo in range(0, rows, 8192):  # the reference's math, on the host, a slice at a time
                qs, ss = quantize_rows_int8(w.table[lo:lo + 8192].float().cpu().numpy())
                q[lo:lo + 8192] = torch.from_numpy(qs).to(self.device)
                s[0, lo:lo + 8192] = torch.from_numpy(ss).to(self.device)
            w.int8 = K.Matrix(K.W_INT8, q, s, rows, w.table.shape[1])
        return w.int8

    def rope_tables(self, theta: float, half: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin float32 [P, D/2] for positions 0..P-1 (the reference's float32 values), grown on demand."""
        have = self._rope.get((theta, half))
        if have is None or have[0].shape[0] < positions:
            n = max(positions, 4096)
            cos, sin = rope_tables(np.arange(n), 2 * half, theta)
            have = (self._put(cos[:, :half]), self._put(sin[:, :half]))
            self._rope[(theta, half)] = have
        return have

    # -- per step ------------------------------------------------------------------------------------
    def _t(self, x) -> torch.Tensor:
        if isinstance(x, Normed):
            return K.norm_quant(x.x, x.weight, x.eps, quant=False)
        if isinstance(x, torch.Tensor):
            return x.contiguous()
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device)

    def _ids(self, ids) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):
            return ids
        return torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)

    def embed(self, table: CudaDense, ids) -> torch.Tensor:
        return table.table.index_select(0, self._ids(ids)).float()

    def rmsnorm(self, x, weight, eps):
        return Normed(self._t(x), weight, float(eps))

    def ternary_matmul(self, x, w: K.Matrix, act_bits):
        if isinstance(x, Normed):
            return K.matmul(x.x, w, norm=x.weight, eps=x.eps, quant=act_bits == 8)
        return K.matmul(self._t(x), w, quant=act_bits == 8)

    def dense_matmul(self, x, w: CudaDense):
        m = self._int8_head(w) if self.lm_head == "int8" else w.matrix
        quant = self.lm_head == "int8"
        if isinstance(x, Normed):
            return K.matmul(x.x, m, norm=x.weight, eps=x.eps, quant=quant)
        return K.matmul(self._t(x), m, quant=quant)

    def rope(self, x, positions, theta):
        x = self._t(x)
        pos = np.asarray(positions, dtype=np.int64)
        cos, sin = self.rope_tables(float(theta), x.shape[-1] // 2, int(pos.max()) + 1)
        return K.rope(x, cos, sin, torch.as_tensor(pos, device=self.device))

    def kv_append(self, cache: CudaKVCache, layer: int, k, v, start: int) -> None:
        t = k.shape[0]
        if start + t > cache.max_len:
            raise ValueError(f"KV cache full: {start + t} positions > {cache.max_len}")
        cache.kv[layer, 0, start:start + t] = self._t(k)
        cache.kv[layer, 1, start:start + t] = self._t(v)

    def attention(self, q, cache: CudaKVCache, layer: int, start: int):
        q = self._t(q)
        t, hq, d = q.shape
        if t == 1:
            tabs = self._tables([cache], [start])
            hkv = cache.kv.shape[3]
            splits = K.choose_splits(1, hkv, start + 1, K.sm_count(self.device))
            out = K.decode_attention_tables(q, *tabs, layer, hkv, splits, kv_f32=cache.kv.dtype == torch.float32,
                                            short_max=K.ATTN_SHORT_MAX, short=start + 1 <= K.ATTN_SHORT_MAX)
            return out.view(1, hq, d)
        return K.prefill_attention(q, cache.kv[layer, 0], cache.kv[layer, 1], start)

    def _tables(self, caches, starts):
        base = torch.tensor([c.kv.data_ptr() for c in caches], dtype=torch.int64, device=self.device)
        maxlen = torch.tensor([c.max_len for c in caches], dtype=torch.int32, device=self.device)
        lengths = torch.tensor([s + 1 for s in starts], dtype=torch.int32, device=self.device)
        return base, maxlen, lengths

    def glu(self, gate, up, act):
        gate, up = self._t(gate), self._t(up)
        if act == "relu2":
            return torch.square(torch.clamp_min(gate, 0)) * up
        return gate / (1.0 + torch.exp(-gate)) * up

    def add(self, a, b):
        return self._t(a) + self._t(b)

    def concat(self, xs):
        xs = [self._t(x) for x in xs]
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=0)

    def split(self, x, sizes):
        return [p.contiguous() for p in torch.split(self._t(x), sizes, dim=1)]

    def to_numpy(self, x) -> np.ndarray:
        return self._t(x).float().cpu().numpy()

    # -- fused decode --------------------------------------------------------------------------------
    def decode_batch(self, net, ids: np.ndarray, segments, greedy: bool = False) -> np.ndarray | None:
        """One decode step (one new token per sequence) -> float32 logits [B, vocab] or, with ``greedy``, each
        sequence's argmax token (int64 [B]: the lm_head folds it in as it stores the logits, and only 8 bytes a
        sequence come to the host); None when this model cannot take the fused path (the caller then runs the
        protocol path)."""
        plan = self._plan(net)
        if plan is None:
            return None
        outs = []
        for lo in range(0, len(segments), BUCKETS[-1]):
            segs = segments[lo:lo + BUCKETS[-1]]
            bucket = next(b for b in BUCKETS if b >= len(segs))
            key = (id(net), bucket)
            step = self._steps.get(key)
            if step is None:
                step = self._steps[key] = DecodeStep(self, net, plan, bucket)
            outs.append(step.run(ids[lo:lo + len(segs)], segs, greedy))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def greedy_chain(self, net, token: int, cache, max_steps: int | None = None) -> "_GreedyChain | None":
        """Greedy decoding of one sequence with one step always in flight (see ``CausalLM.greedy_decode``): the
        step that consumes token t is queued before t reaches the host, its input taken from the last step's
        argmax on the device, so the host's work per token overlaps the GPU's. None (the caller decodes step by
        step) when the fused step cannot run this model or another chain is open."""
        plan = self._plan(net)
        if plan is None or not isinstance(cache, CudaKVCache):
            return None
        key = (id(net), "chain")  # its own step: the batch steps' keys / buffers are never in between
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = DecodeStep(self, net, plan, 1)
        if step.busy:
            return None
        return _GreedyChain(step, int(token), cache, max_steps)

    def warmup(self, net, max_batch: int = 1) -> None:
        """Compile the kernel variants serving uses and capture the decode graphs of every batch bucket up to
        ``max_batch``, on throwaway caches, so that no request waits for Triton's JIT (seconds per variant on
        a fresh machine; Triton keeps them in its on-disk cache, so later starts are quick)."""
        vocab = net.config.vocab_size
        ctx = min(net.config.max_position_embeddings, max(128, K.ATTN_SHORT_MAX + 3))
        for n in (1, 3, 5, 40):  # gemv token counts 1 / 2-4, the two gemm tile heights, prefill attention
            net.forward_batch([(np.arange(n) % vocab, net.make_cache(ctx))], last_only=True)
        for bucket in BUCKETS:
            caches = [net.make_cache(ctx) for _ in range(bucket)]
            for c in caches:
                net.forward_batch([(np.arange(2) % vocab, c)], last_only=True)
            # each attention class's graph (short contexts, then longer ones: the caches' unwritten rows are
            # zeros), its first run eager, the second captured
            for length in (2, K.ATTN_SHORT_MAX):
                if length < 2 or length + 2 > ctx:
                    continue
                for c in caches:
                    c.length = length
                for _ in range(2):
                    net.forward_batch([(np.array([1]), c) for c in caches], last_only=True)
            if bucket >= max_batch:
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _plan(self, net):
        key = id(net)
        if key not in self._plans:
            self._plans[key] = _layer_plans(net)
        return self._plans[key]


class _GreedyChain:
    """See TritonCudaBackend.greedy_chain: an iterator of tokens that holds the chain step until it is closed
    (exhausted, ``close()``, or collected). ``cache.length`` counts the steps whose token was yielded; the step
    in flight writes the position after them, and the cache must not change while the chain is open."""

    def __init__(self, step: "DecodeStep", token: int, cache: CudaKVCache, max_steps: int | None):
        self.step, self.cache = step, cache
        step.busy = True
        self.left = cache.max_len - cache.length
        if max_steps is not None:
            self.left = min(self.left, max_steps)
        self.pos = cache.length  # where the next step queued writes
        self.pending = None
        self.closed = False
        if self.left > 0:
            self.pending = self._launch(token)

    def _launch(self, token: int):
        h = self.step.launch(np.array([token]), [Segment(self.cache, self.pos, 1)], greedy=True)
        self.pos += 1
        self.left -= 1
        return h

    def __iter__(self) -> "_GreedyChain":
        return self

    def __next__(self) -> int:
        if self.closed or self.pending is None:
            self.close()
            raise StopIteration
        if self.cache.length != self.pos - 1:
            self.close()
            raise RuntimeError("the cache changed while a greedy chain was decoding into it")
        try:
            done = self.pending
            # the step consuming done's token, queued before that token is known (-1: the device's argmax)
            self.pending = self._launch(-1) if self.left > 0 else None
            token = int(self.step.collect(done)[0])
        except BaseException:
            self.close()
            raise
        self.cache.length = self.pos - (self.pending is not None)
        return token

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending is not None:  # a step queued past what the caller took: let it finish, drop its token
            self.step.collect(self.pending)
            self.pending = None
        self.step.busy = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit torch may be gone before the chain
            pass


def _layer_plans(net) -> list[LayerPlan] | None:
    cfg = net.config
    d = cfg.head_dim
    if d & (d - 1) or d < 16:
        return None  # the attention kernels take power-of-two head sizes >= 16
    plans = []
    for layer in net.layers:
        fused = (layer.qkv_proj.fused, layer.gate_up_proj.fused)
        if fused[0] is None or fused[1] is None:
            return None
        fused[0].w.repair(d // 2)  # the RoPE + KV-append epilogue pairs each head's two halves
        plans.append(LayerPlan(
            in_norm=layer.input_layernorm.weight, qkv=fused[0].w,
            attn_sub_norm=getattr(getattr(layer, "attn_sub_norm", None), "weight", None), o=layer.o_proj.w,
            post_norm=layer.post_attention_layernorm.weight, gate_up=fused[1].w,
            ffn_sub_norm=getattr(getattr(layer, "ffn_sub_norm", None), "weight", None), down=layer.down_proj.w,
            act=K.ACT_RELU2 if cfg.arch == "bitnet" else K.ACT_SILU))
    return plans


class DecodeStep:
    """The fused decode step for one model and batch bucket: static inputs, and a CUDA graph once warmed."""

    def __init__(self, backend: TritonCudaBackend, net, plans: list[LayerPlan], bucket: int):
        self.be, self.net, self.plans, self.bucket = backend, net, plans, bucket
        cfg = net.config
        dev = backend.device
        self.cfg = cfg
        self.act8 = cfg.act_bits == 8
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cos, self.sin = backend.rope_tables(float(cfg.rope_theta), self.d // 2, cfg.max_position_embeddings)
        self.splits = K.choose_splits(bucket, self.hkv, cfg.max_position_embeddings, K.sm_count(dev))
        # static inputs, one buffer (one host-to-device copy per step): ids int64 [B], cache addresses int64 [B],
        # then int32 [3, B] (positions, lengths, cache sizes); host staging pinned on a GPU, written through numpy,
        # two of it (and of the argmax keys' host copy) so that a step can be prepared while the last one runs
        pin = dev.type == "cuda"
        n8 = 2 * bucket * 8
        self.d_buf = torch.zeros(n8 + 3 * bucket * 4, dtype=torch.uint8, device=dev)
        self.h_bufs = [torch.zeros(self.d_buf.shape[0], dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        # per buffer: numpy views of ids, cache addresses, int32 [3, B]
        self.h_views = [(h[:n8].view(np.int64)[:bucket], h[:n8].view(np.int64)[bucket:],
                         h[n8:].view(np.int32).reshape(3, bucket)) for h in (b.numpy() for b in self.h_bufs)]
        self.ids, self.base = self.d_buf[:n8].view(torch.int64)[:bucket], self.d_buf[:n8].view(torch.int64)[bucket:]
        self.i32 = self.d_buf[n8:].view(torch.int32).view(3, bucket)
        self.pad = backend.make_cache(cfg.num_hidden_layers, self.hkv, self.d, 1)  # where padding rows write
        self.x = torch.zeros((bucket, cfg.hidden_size), dtype=torch.float32, device=dev)
        self.q = torch.zeros((bucket, self.hq * self.d), dtype=torch.float32, device=dev)
        # the o gemv's last program normalizes + quantizes the residual rows for gate/up (int8 rows, scales)
        self.fold_norm = self.act8 and bucket <= min(K.GEMV_MAX_TOKENS, K.FOLD_MAX_TOKENS) and K.FOLD_NORM
        if self.fold_norm:
            self.xq = torch.zeros((bucket, cfg.hidden_size), dtype=torch.int8, device=dev)
            self.xs = torch.zeros((bucket,), dtype=torch.float32, device=dev)
        self.scratch: dict = {}
        self.kv_f32 = self.pad.kv.dtype == torch.float32
        self.keys = K.new_argmax_keys(bucket, dev)  # each row's argmax (reset by the embedding kernel)
        self.h_keys = [torch.zeros(bucket, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.done = [torch.cuda.Event() if pin else None for _ in range(2)]
        self.slot = 0
        self.busy = False  # a greedy chain is open on this step (TritonCudaBackend.greedy_chain)
        # a graph and its logits per attention class: short (every context at most K.ATTN_SHORT_MAX: no merge
        # kernel) or not; a class's first step runs eagerly (Triton compiles then), its next one is captured.
        # graph: the one the last launch replayed
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.ran_eagerly: set[bool] = set()
        self.graph = None
        self.logits = None
        self.h_logits = None  # pinned host copy of the logits, made at the first step
        self.runs = 0

    def run(self, ids: np.ndarray, segments, greedy: bool = False) -> np.ndarray:
        """One step, waited for: float32 logits [n, vocab] or, with ``greedy``, the argmax tokens int64 [n]."""
        return self.collect(self.launch(ids, segments, greedy))

    def launch(self, ids: np.ndarray, segments, greedy: bool) -> tuple[int, int, bool]:
        """Queue one step (tables, graph, the result's copy to the host) and return without waiting: a handle
        for ``collect``. An id of -1 feeds the row the argmax token the last step of this object picked for
        the same row (it never reaches the host: a chain of greedy steps runs without the host in between).
        A greedy launch may be queued before the last one is collected (two staging buffers and two host key
        buffers take turns); the logits have one host buffer, so a step that returns them is collected first."""
        n = len(segments)
        for s in segments:
            if not isinstance(s.cache, CudaKVCache) or s.cache.kv.dtype != self.pad.kv.dtype:
                raise ValueError("every cache of a decode step must come from this backend's make_cache")
            if s.start + 1 > s.cache.max_len:
                raise ValueError(f"context full: {s.start} + 1 tokens > {s.cache.max_len}")
        last = max(s.start for s in segments)
        if last >= self.cos.shape[0]:  # positions past the RoPE tables: grow them
            self.cos, self.sin = self.be.rope_tables(float(self.cfg.rope_theta), self.d // 2, 2 * last + 1)
            self.graphs.clear()  # the graphs read the old tables: capture again
            self.ran_eagerly.clear()
        short = last + 1 <= K.ATTN_SHORT_MAX
        slot = self.slot
        self.slot ^= 1
        h_ids, h_base, h_i32 = self.h_views[slot]
        caches = [s.cache for s in segments] + [self.pad] * (self.bucket - n)
        h_ids[:n] = ids
        h_ids[n:] = 0
        h_i32[0, :n] = [s.start for s in segments]
        h_i32[0, n:] = 0
        h_i32[1] = h_i32[0] + 1
        h_i32[2] = [c.max_len for c in caches]
        h_base[:] = [c.kv.data_ptr() for c in caches]
        self.d_buf.copy_(self.h_bufs[slot], non_blocking=True)
        if short not in self.graphs and self.be.graphs and short in self.ran_eagerly:
            self._capture(short)
        if short in self.graphs:
            self.graph, self.logits = self.graphs[short]
            self.graph.replay()
        else:
            self.graph, self.logits = None, self.body(short)
            self.ran_eagerly.add(short)
        self.runs += 1
        if greedy:
            self.h_keys[slot][:n].copy_(self.keys[:n], non_blocking=True)
        else:
            # through pinned memory: ~12 us a step quicker than .cpu() for a 128k vocabulary (H200)
            if self.h_logits is None or self.h_logits.shape != self.logits.shape:
                self.h_logits = torch.empty(self.logits.shape, dtype=self.logits.dtype,
                                            pin_memory=self.logits.is_cuda)
            self.h_logits[:n].copy_(self.logits[:n], non_blocking=True)
        if self.done[slot] is not None:
            self.done[slot].record()
        return slot, n, greedy

    def collect(self, handle: tuple[int, int, bool]) -> np.ndarray:
        """Wait for a launched step: its argmax tokens int64 [n] (greedy) or float32 logits [n, vocab]."""
        slot, n, greedy = handle
        if self.done[slot] is not None:
            self.done[slot].synchronize()
        if greedy:
            return K.argmax_from_keys(self.h_keys[slot][:n].numpy())
        return self.h_logits[:n].numpy().copy()

    def _capture(self, short: bool) -> None:
        torch.cuda.synchronize(self.be.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = self.body(short)
        self.graphs[short] = (g, logits)

    def body(self, short: bool) -> torch.Tensor:
        """The whole decode step on the static inputs (eager, or recorded into the graph); ``short``: every
        context is at most K.ATTN_SHORT_MAX positions."""
        be, cfg, eps = self.be, self.cfg, float(self.cfg.rms_norm_eps)
        net = self.net
        pos, lengths, maxlen = self.i32[0], self.i32[1], self.i32[2]
        x = self.x
        K.embed(net.embed.table, self.ids, x, keys=self.keys)
        # early: positions, lengths and cache tables come with the step's one host-to-device copy, before any kernel
        qkv = dict(q_out=self.q, cos=self.cos, sin=self.sin, pos=pos, base=self.base, maxlen=maxlen,
                   hq=self.hq, hkv=self.hkv, head_dim=self.d, kv_f32=self.kv_f32, early=True)
        q3 = self.q.view(self.bucket, self.hq, self.d)
        fused_qkv = self.bucket <= K.GEMV_MAX_TOKENS  # RoPE + KV append in the gemv epilogue
        for i, p in enumerate(self.plans):
            if fused_qkv:
                K.matmul(x, p.qkv, norm=p.in_norm, eps=eps, quant=self.act8, qkv=dict(qkv, layer=i))
            else:
                y = K.matmul(x, p.qkv, norm=p.in_norm, eps=eps, quant=self.act8)
                K.rope_append(y, self.q, self.cos, self.sin, pos, self.base, maxlen, i, self.hq, self.hkv, self.d,
                              self.kv_f32)
            a = K.decode_attention_tables(q3, self.base, maxlen, lengths, i, self.hkv, self.splits,
                                          scratch=self.scratch, kv_f32=self.kv_f32, early=True,
                                          short_max=K.ATTN_SHORT_MAX, short=short)
            if self.fold_norm:
                K.matmul(a, p.o, norm=p.attn_sub_norm, eps=eps, quant=True, out=x, residual=True,
                         next_norm=(p.post_norm, eps, self.xq, self.xs))
                m = K.matmul(self.xq, p.gate_up, sx=self.xs, glu=p.act)
            else:
                K.matmul(a, p.o, norm=p.attn_sub_norm, eps=eps, quant=self.act8, out=x, residual=True)
                m = K.matmul(x, p.gate_up, norm=p.post_norm, eps=eps, quant=self.act8, glu=p.act)
            K.matmul(m, p.down, norm=p.ffn_sub_norm, eps=eps, quant=self.act8, out=x, residual=True)
        head = be._int8_head(net.lm_head) if be.lm_head == "int8" else net.lm_head.matrix
        return K.matmul(x, head, norm=net.norm.weight, eps=float(net.norm.eps), quant=be.lm_head == "int8",
                        argmax=self.keys)
