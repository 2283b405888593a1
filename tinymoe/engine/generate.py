"""Generation: prefill, decode one token, sample, and the loop that times them (after gpt-fast).

TPOT (time per output token) excludes the first token, as in the paper: the first token's time
is prefill (time to first token, TTFT); every later token costs one decode step.

generate(compile=True) runs the decode steps through torch.compile (compiled_forward): the
same forward pass, traced once, with inductor's fused kernels instead of one kernel per
operation. Prefill stays eager (it runs once, and every prompt length would be a new graph).
The steps that compile, or record a CUDA graph, are kept out of TPOT (warmup_steps).
"""

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.timing import now, summarize_ms
from tinymoe.errors import TinyMoeError

PACKAGE = Path(__file__).resolve().parents[1]  # tinymoe/, to find its frames in a traceback


@dataclass
class GenerationResult:
    tokens: list[int]  # the new token ids (prompt excluded)
    prompt_len: int
    ttft_s: float  # prefill + first token
    step_s: list[float] = field(default_factory=list)  # one decode step per later token
    stopped_at_eos: bool = False
    # compile=True: the first decode step, which traces and compiles (unless an earlier call
    # compiled this model already); kept out of step_s, so TPOT is the compiled steady state
    compile_s: float | None = None
    # compile=True with CUDA graphs: the second decode step, in which CUDA-graph trees record
    # the graph (the first ran the compiled step once to warm up); kept out of step_s too. In a
    # later generation the first step records (a new KV cache) and this one is a plain replay,
    # kept out all the same: which steps count never depends on what ran before.
    record_s: float | None = None

    @property
    def tpot_ms(self) -> dict[str, float]:
        return summarize_ms(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        """The first token and the timed decode steps' over their time (the steps kept out of
        step_s, compiling or recording, are left out of both)."""
        total = self.ttft_s + sum(self.step_s)
        return (1 + len(self.step_s)) / total if total > 0 else float("nan")


def sample(
    logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None, top_k: int = 0
) -> Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top_k > 0 keeps the k likeliest
    ids, then top_p the smallest nucleus of those (the order transformers applies them in)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


# inference_mode rather than no_grad: it also skips autograd's view and version bookkeeping, which
# takes 7-16% off a small CPU decode step (bound by per-op overhead; docs/results.md). It is
# thread-local, and tensors made inside it (logits, routings a hook keeps) cannot enter autograd.
@torch.inference_mode()
def prefill(model: MoETransformer, ids: Tensor, cache: KVCache) -> Tensor:
    """Run the whole prompt (1, T) in one step; return the last position's logits (1, V)."""
    return model(ids, cache=cache, start=0)[:, -1]


@torch.inference_mode()
def decode_one_token(
    model: MoETransformer, token: Tensor, cache: KVCache, pos: int | Tensor
) -> Tensor:
    """One new token (1, 1) at position pos (an int, or a (1,) tensor: see forward) -> (1, V)."""
    return model(token, cache=cache, start=pos)[:, -1]


def cuda_graphs_apply(model: MoETransformer) -> bool:
    """Whether the compiled decode step is also captured as a CUDA graph: on CUDA, with neither a
    route hook nor an offloading provider installed (their eager calls cut the step into pieces
    around host work: reading ids, Python state, copies on another stream)."""
    on_cuda = model.embed_tokens.weight.device.type == "cuda"
    return on_cuda and model.route_hook is None and model.provider is model.experts


def warmup_steps(compile: bool, cuda_graphs: bool) -> int:
    """How many decode steps generate keeps out of TPOT (step_s): under compile, the first (it
    compiles, once per model; with CUDA graphs it also runs the step once, eagerly, to warm up
    the graph's memory pool) and, with CUDA graphs, the second, in which CUDA-graph trees record
    the graph; replays start at the third. A count fixed before the loop, never a clock."""
    return (2 if cuda_graphs else 1) if compile else 0


def compiled_forward(model: MoETransformer, cuda_graphs: bool = False) -> Callable[..., Tensor]:
    """model.forward compiled with torch.compile for the static-shape decode step (start a (1,)
    tensor: MoETransformer._static_step, one graph for every position), made once per model (and
    mode) and kept on it. cuda_graphs: also capture it as a CUDA graph (mode "reduce-overhead"),
    replayed each step as one launch instead of one per kernel. A route hook or an offloading
    provider runs eagerly inside the step (model.outside_graph), the layer loop too, each layer
    compiled in pieces around them (MoETransformer._layers_with_host_calls); with neither, the
    whole step is one graph: the experts are read by index (experts_by_index) and no id goes
    to the host."""
    mode = "reduce-overhead" if cuda_graphs else "default"
    if mode not in model.compiled:
        if model.embed_tokens.weight.device.type == "cpu":
            _need_a_cpp_compiler()
        fn = MoETransformer.forward.__get__(model)
        # dynamic=None: shapes static unless marked (compiled_steps marks the cache length) or
        # seen to change (the layer index of the pieces a hook or provider cuts the step into)
        model.compiled[mode] = torch.compile(fn, dynamic=None, mode=mode)
    return model.compiled[mode]


def _need_a_cpp_compiler() -> None:
    """On the CPU inductor builds its kernels with a C++ compiler: without one, say so now, in
    one line, rather than in a long trace from inside the first compiled step."""
    from torch._inductor import cpp_builder, exc  # (inductor's own search, as it will run it)

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise TinyMoeError(
            "--compile on the CPU needs a C++ compiler, which torch.compile builds its kernels "
            "with; install one (Debian/Ubuntu: apt install g++) or run without --compile"
        ) from None


@contextmanager
def compiled_steps(model: MoETransformer) -> Iterator[None]:
    """Inside the block, model(token, cache, start) runs the compiled decode step. The model's
    forward hooks (the offloading runtime's, which tell prefill from decode) still run around
    it, eagerly. An int start is made a (1,) tensor on the token's device (generate keeps one on
    the device instead, so a step costs no host-to-device copy)."""
    graphs = cuda_graphs_apply(model)
    step = compiled_forward(model, graphs)
    prepared: KVCache | None = None  # the cache prepare() saw last

    def prepare(cache: KVCache) -> None:
        """Once per cache. Its length (and the rotary table's) changes from one generation to
        the next: made symbolic, so one compilation serves them all (positions never change a
        shape). With CUDA graphs, the cache and the table keep their addresses from step to
        step: the graph reads and writes them in place instead of copying them in as inputs; a
        new cache (a new generation) has the graph recorded again, not recompiled."""
        rope = model._rope or ()  # (made by the prefill before, normally)
        for t in (cache.k, cache.v):  # (L, B, Hkv, max_len, Dh)
            torch._dynamo.mark_dynamic(t, 3)
        for t in rope:  # (n, Dh)
            torch._dynamo.mark_dynamic(t, 0)
        if graphs:
            for t in (cache.k, cache.v, *rope):
                torch._dynamo.mark_static_address(t)

    def forward(input_ids: Tensor, cache: KVCache | None = None, start: int | Tensor = 0):
        nonlocal prepared
        if not isinstance(start, Tensor):
            start = torch.tensor([start], device=input_ids.device)
        # Tensors made outside inference_mode differ in kind (a dispatch key) from those made
        # inside, and the graph's guards would compile the step again for them: pass one kind.
        if not input_ids.is_inference():
            input_ids = input_ids.clone()
        if not start.is_inference():
            start = start.clone()
        if cache is not None and cache is not prepared:
            prepare(cache)
            prepared = cache
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs were consumed
        return step(input_ids, cache, start)

    saved = vars(model).get("forward")  # normally none: forward is MoETransformer's method
    model.forward = forward  # an instance attribute: nn.Module.__call__ uses it
    try:
        yield
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved


def generate(
    model: MoETransformer,
    input_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_ids: list[int] | tuple[int, ...] | None = None,
    on_token: Callable[[int], bool | None] | None = None,
    top_k: int = 0,
    compile: bool = False,
) -> GenerationResult:
    """Generate up to max_new_tokens after input_ids (batch 1). Stops early at an EOS id.

    eos_ids defaults to the checkpoint's eos_token_id; pass () to never stop early.
    on_token is called with each new id as soon as it exists (for streamed printing); if it
    returns True, generation ends there (run.py's stop strings). top_k: see sample().
    compile: run the decode steps compiled (compiled_forward); the first one compiles.
    """
    if not input_ids:
        raise TinyMoeError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise TinyMoeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise TinyMoeError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise TinyMoeError(f"top_k must be >= 0 (0: off), got {top_k}")
    cfg = model.cfg
    bad = [t for t in input_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise TinyMoeError(f"token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
    eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
    param = model.embed_tokens.weight
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    max_len = len(input_ids) + max_new_tokens
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, max_len, cfg.head_dim, device, dtype)

    ids = torch.tensor([input_ids], device=device)  # (1, T)
    t0 = now()
    try:
        token = sample(prefill(model, ids, cache), temperature, top_p, gen, top_k)  # (1,)
        tok = int(token.item())  # SYNC: the host needs the id to decide whether to stop
    except Exception as e:
        _name_cuda_error(e, "the prefill")
        raise
    ttft = now() - t0
    result = GenerationResult(tokens=[tok], prompt_len=len(input_ids), ttft_s=ttft)
    stop = bool(on_token and on_token(tok))
    pos = len(input_ids)
    warmup = warmup_steps(compile, compile and cuda_graphs_apply(model))
    steps = 0  # decode steps done
    try:
        with torch.inference_mode(), compiled_steps(model) if compile else nullcontext():
            # The compiled step takes its position as a (1,) tensor on the device, advanced in
            # place (made, like every tensor the steps make, under inference_mode: the same
            # kind of tensor from step to step, which the compiled graph's guards check).
            position = torch.tensor([pos], device=device) if compile else None
            while len(result.tokens) < max_new_tokens and tok not in eos and not stop:
                model.compiling = steps < warmup  # (a runtime meters these steps apart)
                t0 = now()
                at = pos if position is None else position
                logits = decode_one_token(model, token.view(1, 1), cache, at)
                token = sample(logits, temperature, top_p, gen, top_k)
                tok = int(token.item())  # SYNC: one per token, as above; the step is done
                took = now() - t0
                if steps >= warmup:
                    result.step_s.append(took)
                elif steps == 0:
                    result.compile_s = took
                else:
                    result.record_s = took
                steps += 1
                result.tokens.append(tok)
                pos += 1
                if position is not None:
                    position += 1
                stop = bool(on_token and on_token(tok))
    except Exception as e:
        _name_cuda_error(e, f"decode step {steps + 1}")
        raise
    finally:
        model.compiling = False
    result.stopped_at_eos = tok in eos
    return result


def _name_cuda_error(e: Exception, during: str) -> None:
    """Raise a TinyMoeError, from e, if e is an error CUDA reported; else return (the caller
    re-raises e as it is).

    CUDA reports a failure of queued work (a kernel, an expert copy on the copy stream) at the
    first CUDA call after it that checks, and at the latest at the next host sync: for a copy
    the compute stream waited for, the next layer's ids read or the step's token read (every
    `# SYNC:` of a step comes after the waits it queued). So the message names the sync, or
    other call, where it surfaced, and how to find the operation that failed. The CUDA context
    is lost after such an error: nothing on this device can run again in this process.
    """
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8
    if not isinstance(e, accelerator_error) and not str(e).startswith("CUDA error"):
        return
    frames = [
        f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(str(PACKAGE))
    ]
    where = "(no tinymoe frame)"
    if frames:
        f = frames[-1]
        where = f"{Path(f.filename).relative_to(PACKAGE.parent)}:{f.lineno} ({f.name})"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise TinyMoeError(
        f"CUDA reported an error during {during}, at {where}: {first}. It may come from work "
        "queued earlier (a kernel, an expert copy), reported at the next sync; rerun with "
        "CUDA_LAUNCH_BLOCKING=1 to see the operation"
    ) from e
