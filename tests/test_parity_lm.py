"""Parity of the LM graphs and the LM state machine with upstream moshi 0.2.13.

The oracle is a float32 upstream `LMModel` with the tiny PersonaPlex-shaped
config (weights rounded through bfloat16, as real checkpoints are), run with
onnxruntime on CPU on our side.

PersonaPlex's generation loop (NVIDIA's LMGen, mirrored by runtime/lm_state.py)
differs from moshi 0.2.13's in two ways the oracle has to bridge:
* its depformer has dep_q = n_q = 16 steps (the last 8 predict the user, and are
  always forced to the user's codes), so moshi's LMGen would take no user input.
  The depth steps are causal, so a dep_q = 8 moshi model holding the first 8
  steps' weights predicts the same agent tokens and does take the user codes;
* its first call only primes the token ring (nothing to predict yet), so
  PersonaPlex call n is moshi call n - 1 given the same per-call user codes.
Forced prompts go through moshi's `depformer_replace_tokens` (all agent streams
forced) and by writing forced tokens into moshi's token cache after the step.
(During development the same 120-call schedule was also run through NVIDIA's own
LMGen from github.com/NVIDIA/personaplex: all 17 streams of every frame matched.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
lm_mod = pytest.importorskip("moshi.models.lm")

from streaming_driver import StreamingSession  # noqa: E402

from personaplex_edge.export.config import LMConfig, tiny_config  # noqa: E402
from personaplex_edge.export.graphs.builder import GraphBuilder  # noqa: E402
from personaplex_edge.export.graphs.depformer import build_depformer  # noqa: E402
from personaplex_edge.export.graphs.sampling import reference_sample_top_k, sample_top_k  # noqa: E402
from personaplex_edge.export.graphs.temporal import build_prefill, build_step  # noqa: E402
from personaplex_edge.runtime.core.lm_state import LMState  # noqa: E402

AGENT = 8  # PersonaPlex: streams 1..8 agent audio, 9..16 user audio
PROMPT_CALLS = 20
SMALL_CONTEXT = 16


# -- upstream model and our graphs -----------------------------------------------------

def upstream_kwargs(cfg: LMConfig, **override) -> dict:
    kw = dataclasses.asdict(cfg)
    kw.pop("demux_second_stream")
    kw["delays"] = list(kw["delays"])
    kw.update(override)
    return kw


def make_upstream(cfg: LMConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = lm_mod.LMModel(**upstream_kwargs(cfg), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):  # norms start at 1: make a mis-mapped norm visible
                p.copy_(1 + 0.2 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    return model, weights


def agent_only_upstream(cfg: LMConfig, weights: dict):
    """A dep_q = 8 upstream model sharing the first 8 depth steps' weights (see module doc)."""
    model = lm_mod.LMModel(**upstream_kwargs(cfg, dep_q=AGENT), dtype=torch.float32).eval()
    keys = model.state_dict().keys()
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in keys}, strict=True)
    return model


class Graph:
    """An onnxruntime session driven by the shared test driver (rings, offsets)."""

    def __init__(self, g: GraphBuilder, path: Path):
        g.save(path)
        self.meta = g.meta
        self.specs = {s.name: s for s in g.specs}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.driver = StreamingSession(session, g.specs)

    def reset(self) -> None:
        self.driver.reset()

    def follow(self, other: Graph) -> None:
        """Continue from `other`'s caches and offset (same cache layout)."""
        self.driver.values, self.driver.offset = other.driver.values, other.driver.offset

    def run(self, offset: int | None = None, **feeds) -> dict[str, np.ndarray]:
        """One call; `offset`, when given, is what the caller believes is cached."""
        if offset is not None:
            assert self.driver.offset == offset, (self.driver.offset, offset)
        return self.driver.step(**feeds)

    def cached(self, name: str, start: int, count: int) -> np.ndarray:
        """Ring entries of positions start..start+count-1 of cache `name`."""
        spec = self.specs[name]
        ring = self.driver.values[name]
        slots = (start + np.arange(count)) % ring.shape[spec.slot_axis]
        return np.take(ring, slots, axis=spec.slot_axis)


def build_graphs(cfg: LMConfig, weights: dict, tmp: Path, prefill_steps: int) -> dict[str, Graph]:
    def make(name: str, build: Callable[[GraphBuilder], None]) -> Graph:
        g = GraphBuilder(name, data_path=tmp / f"{name}.onnx.data")
        build(g)
        return Graph(g, tmp / f"{name}.onnx")

    return {
        "step": make("lm_step", lambda g: build_step(g, weights, cfg)),
        "prefill": make("lm_prefill", lambda g: build_prefill(g, weights, cfg, prefill_steps)),
        "depformer": make("depformer", lambda g: build_depformer(g, weights, cfg)),
        "depformer8": make("depformer8", lambda g: build_depformer(g, weights, cfg, steps=AGENT)),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config().lm
    model, weights = make_upstream(cfg)
    graphs = build_graphs(cfg, weights, tmp_path_factory.mktemp("lm"), prefill_steps=32)
    return cfg, model, weights, graphs


@pytest.fixture(scope="module")
def small_context(tmp_path_factory):
    cfg = dataclasses.replace(tiny_config().lm, context=SMALL_CONTEXT)
    model, weights = make_upstream(cfg, seed=1)
    graphs = build_graphs(cfg, weights, tmp_path_factory.mktemp("lm_ctx"), prefill_steps=SMALL_CONTEXT)
    return cfg, model, weights, graphs


def close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> float:
    """Max abs difference, asserted <= rel * max(1, scale of ref)."""
    diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())
    assert diff <= rel * max(1.0, float(np.abs(ref).max())), diff
    return diff


def greedy_feeds(vocab: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"temperature": np.array([1.0], np.float32), "top_k": np.array([1], np.int64),
            "noise": np.ones((rows, vocab), np.float32)}


def random_rows(cfg: LMConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    rows = np.concatenate([rng.integers(0, cfg.text_card + 1, (n, 1)),
                           rng.integers(0, cfg.card + 1, (n, cfg.n_q))], axis=1)
    rows[rng.random(rows.shape) < 0.1] = -1
    return rows.astype(np.int64)


def step_temporal(graph: Graph, cfg: LMConfig, row: np.ndarray, offset: int) -> dict[str, np.ndarray]:
    g = greedy_feeds(cfg.text_card)
    return graph.run(offset, tokens=row[None], text_temperature=g["temperature"],
                     text_top_k=g["top_k"], text_noise=g["noise"])


# -- (a) logits -----------------------------------------------------------------------

def test_step_and_depformer_logits_match_upstream(tiny):
    cfg, model, _, graphs = tiny
    step, dep = graphs["step"], graphs["depformer"]
    step.reset()
    rng = np.random.default_rng(0)
    rows = random_rows(cfg, rng, 12)
    rows[0] = -1
    with torch.no_grad(), model.streaming(1):
        for t, row in enumerate(rows):
            ours = step_temporal(step, cfg, row, t)
            hidden, logits = model.forward_text(torch.from_numpy(row).view(1, -1, 1))
            close(ours["hidden"], hidden.numpy())
            close(ours["text_logits"], logits.numpy().reshape(1, -1))
            assert ours["text_token"][0] == int(logits.argmax())
    # Depformer on the last hidden state, with some steps forced.
    mask = np.zeros(cfg.dep_q, bool)
    mask[[2, 5]] = True
    mask[AGENT:] = True
    forced = rng.integers(0, cfg.card, cfg.dep_q)
    text_token = 7
    out = dep.run(hidden=ours["hidden"], text_token=np.array([text_token]), forced_tokens=forced,
                  force_mask=mask, **greedy_feeds(cfg.card, cfg.dep_q))
    ref_tokens, ref_logits = [], []
    prev = torch.tensor([text_token])
    with torch.no_grad(), model.depformer.streaming(1):
        for k in range(cfg.dep_q):
            logits = model.forward_depformer(k, prev.view(1, 1, 1), torch.from_numpy(ours["hidden"]))
            token = int(forced[k]) if mask[k] else int(logits.argmax())
            ref_tokens.append(token)
            ref_logits.append(logits.reshape(-1).numpy())
            prev = torch.tensor([token])
    close(out["audio_logits"], np.stack(ref_logits))
    assert out["audio_tokens"].tolist() == ref_tokens


# -- (b), (d) greedy generation through the state machine -------------------------------

@dataclasses.dataclass
class Schedule:
    """Per-call inputs: user codes every call; agent audio and text forced for the first calls."""

    user: np.ndarray  # [N, 8]
    agent: np.ndarray  # [PROMPT_CALLS, 8]
    text: np.ndarray  # [PROMPT_CALLS]

    @staticmethod
    def random(cfg: LMConfig, calls: int, seed: int) -> Schedule:
        rng = np.random.default_rng(seed)
        return Schedule(rng.integers(0, cfg.card, (calls, AGENT)),
                        rng.integers(0, cfg.card, (PROMPT_CALLS, AGENT)),
                        rng.integers(0, cfg.text_card, PROMPT_CALLS))

    def forced_targets(self, cfg: LMConfig, n: int) -> tuple[int | None, dict[int, int]]:
        """Independent of LMState: forced text and agent tokens of ring column n."""
        text = int(self.text[n]) if n < PROMPT_CALLS else None
        agent = {}
        for k in range(1, 1 + AGENT):
            d = cfg.delays[k]
            if n <= d:
                agent[k] = cfg.card
            elif n - d < PROMPT_CALLS:
                agent[k] = int(self.agent[n - d, k - 1])
        return text, agent


def generate_ours(cfg: LMConfig, graphs: dict[str, Graph], sched: Schedule, dep_name: str):
    step, dep = graphs["step"], graphs[dep_name]
    step.reset()
    state = LMState.from_config(cfg)
    steps = dep.meta["steps"]
    frames, text_logits = [], []
    for n in range(len(sched.user)):
        prompt = n < PROMPT_CALLS
        inp = state.next_input(user=sched.user[n], agent=sched.agent[n] if prompt else None,
                               text=int(sched.text[n]) if prompt else None)
        if inp is None:
            frames.append(None)
            continue
        out = step_temporal(step, cfg, inp.tokens, state.offset - 1)
        text_logits.append(out["text_logits"][0])
        audio = dep.run(hidden=out["hidden"], text_token=np.array([inp.text_token(out["text_token"][0])]),
                        forced_tokens=inp.audio_targets[:steps], force_mask=inp.audio_force_mask[:steps],
                        **greedy_feeds(cfg.card, steps))
        frames.append(state.commit(int(out["text_token"][0]), audio["audio_tokens"]))
    return frames, text_logits


def generate_upstream(cfg: LMConfig, weights: dict, sched: Schedule):
    model = agent_only_upstream(cfg, weights)
    text_logits = []
    gen = lm_mod.LMGen(model, use_sampling=False,
                       on_text_logits_hook=lambda x: text_logits.append(x.reshape(-1).numpy().copy()))
    frames = [None]  # our call 0 has no moshi counterpart
    with torch.no_grad(), gen.streaming(1):
        for m in range(len(sched.user) - 1):
            text, agent = sched.forced_targets(cfg, m + 1)
            user = torch.from_numpy(sched.user[m]).view(1, AGENT, 1)
            if len(agent) == AGENT:
                replace = torch.tensor([agent[k] for k in range(1, 1 + AGENT)]).view(1, AGENT, 1)
                out = gen.step(user, depformer_replace_tokens=replace)
            else:
                out = gen.step(user)
            state = gen._streaming_state
            col = int(state.offsets[0]) % state.cache.shape[2]
            for k, token in agent.items():
                state.cache[0, k, col] = token
            if text is not None:
                state.cache[0, 0, col] = text
            if out is not None:  # re-read: moshi gathered the frame before the forced writes
                delays = np.asarray(cfg.delays[: 1 + AGENT])
                cols = (int(state.offsets[0]) - max(cfg.delays) + delays) % state.cache.shape[2]
                out = state.cache[0, np.arange(1 + AGENT), cols]
            frames.append(None if out is None else out.numpy().copy())
    return frames, text_logits


def check_generation(cfg: LMConfig, weights: dict, graphs: dict[str, Graph], calls: int, seed: int):
    sched = Schedule.random(cfg, calls, seed)
    ref_frames, ref_logits = generate_upstream(cfg, weights, sched)
    for dep_name in ("depformer", "depformer8"):
        frames, logits = generate_ours(cfg, graphs, sched, dep_name)
        assert len(logits) == len(ref_logits) == calls - 1
        close(np.stack(logits), np.stack(ref_logits))
        for n, (ours, ref) in enumerate(zip(frames, ref_frames, strict=True)):
            assert (ours is None) == (ref is None), n
            if ours is None:
                continue
            assert ours[: 1 + AGENT].tolist() == ref.tolist(), (n, ours, ref)
            assert ours[1 + AGENT:].tolist() == sched.user[n - 1].tolist(), n
    generated = np.stack([f for f in ref_frames[PROMPT_CALLS + 2:]])
    assert len(np.unique(generated[:, 0])) > 3 and len(np.unique(generated[:, 1])) > 3  # not degenerate


def test_greedy_generation_matches_lmgen(tiny):
    cfg, _, weights, graphs = tiny
    check_generation(cfg, weights, graphs, calls=120, seed=2)


def test_sliding_window_generation_matches_lmgen(small_context):
    cfg, _, weights, graphs = small_context
    check_generation(cfg, weights, graphs, calls=4 * SMALL_CONTEXT + 5, seed=3)


# -- (c), (d) batched prefill ------------------------------------------------------------

def prefill(graph: Graph, rows: np.ndarray, offset: int, embeddings: np.ndarray | None = None):
    if embeddings is None:
        embeddings = np.zeros((1, len(rows), graph.specs["hidden"].shape[-1]), np.float32)
    return graph.run(offset, tokens=rows[None], embeddings=embeddings)


def test_prefill_equals_steps(tiny):
    cfg, _, _, graphs = tiny
    step, pre = graphs["step"], graphs["prefill"]
    step.reset()
    pre.reset()
    rows = random_rows(cfg, np.random.default_rng(4), 19)
    offset = 0
    for chunk in (rows[:12], rows[12:]):
        batch = prefill(pre, chunk, offset)
        for t, row in enumerate(chunk):
            single = step_temporal(step, cfg, row, offset + t)
            close(batch["hidden"][:, t], single["hidden"][:, 0], rel=1e-5)
        for i in range(cfg.num_layers):
            for name in (f"k.{i}", f"v.{i}"):
                close(pre.cached(name, offset, len(chunk)), step.cached(name, offset, len(chunk)),
                      rel=1e-5)
        offset += len(chunk)


def test_prefill_voice_embeddings_match_upstream(tiny):
    """A preset's per-step embeddings (tokens all -1), then ordinary steps, vs upstream."""
    cfg, model, _, graphs = tiny
    step, pre = graphs["step"], graphs["prefill"]
    pre.reset()
    rng = np.random.default_rng(5)
    preset = (rng.standard_normal((1, 10, cfg.dim)) * 0.5).astype(np.float32)
    rows = random_rows(cfg, rng, 6)
    with torch.no_grad(), model.streaming(1):
        ref = model.out_norm(model.transformer(torch.from_numpy(preset)))
        ours = prefill(pre, np.full((10, cfg.num_streams), -1, np.int64), 0, preset)
        close(ours["hidden"], ref.numpy())
        step.follow(pre)  # same cache layout: the steps continue after the preset
        for t, row in enumerate(rows):
            single = step_temporal(step, cfg, row, 10 + t)
            hidden, logits = model.forward_text(torch.from_numpy(row).view(1, -1, 1))
            close(single["hidden"], hidden.numpy())
            close(single["text_logits"], logits.numpy().reshape(1, -1))
    step.reset()


def test_prefill_sliding_window_matches_upstream(small_context):
    """Prefill chunks that wrap the ring, then steps: > 3x the context, vs upstream stepping."""
    cfg, model, _, graphs = small_context
    step, pre = graphs["step"], graphs["prefill"]
    pre.reset()
    rows = random_rows(cfg, np.random.default_rng(6), 3 * SMALL_CONTEXT + 8)
    chunks = [(0, 10), (10, 26), (26, 35)]
    with torch.no_grad(), model.streaming(1):
        ref = [model.forward_text(torch.from_numpy(r).view(1, -1, 1)) for r in rows]
    for start, end in chunks:
        batch = prefill(pre, rows[start:end], start)
        for t in range(start, end):
            close(batch["hidden"][:, t - start], ref[t][0].numpy()[:, 0])
    step.follow(pre)
    for t in range(chunks[-1][1], len(rows)):
        single = step_temporal(step, cfg, rows[t], t)
        close(single["hidden"], ref[t][0].numpy())
        close(single["text_logits"], ref[t][1].numpy().reshape(1, -1))
    step.reset()


def test_prefill_rejects_steps_beyond_context():
    cfg = dataclasses.replace(tiny_config().lm, context=SMALL_CONTEXT)
    with pytest.raises(ValueError, match="max_steps"):
        build_prefill(GraphBuilder("x"), {}, cfg, SMALL_CONTEXT + 1)


def test_missing_weight_is_named(tiny):
    cfg, _, weights, _ = tiny
    partial = {k: v for k, v in weights.items() if k != "depformer.layers.1.gating.5.linear_in.weight"}
    with pytest.raises(KeyError, match="depformer.layers.1.gating.5.linear_in.weight"):
        build_depformer(GraphBuilder("x"), partial, cfg)


# -- (e) sampler ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    rows, vocab, k_max = 4000, 300, 250
    g = GraphBuilder("sampler")
    token = sample_top_k(g, g.input("logits", np.float32, (rows, vocab)),
                         g.input("temperature", np.float32, (1,)), g.input("top_k", np.int64, (1,)),
                         g.input("noise", np.float32, (rows, vocab)), k_max, vocab)
    g.output(token, "token", np.int64, (rows,))
    path = tmp_path_factory.mktemp("sampler") / "sampler.onnx"
    g.save(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(logits, temperature, top_k, noise):
        return session.run(None, {"logits": logits, "temperature": np.array([temperature], np.float32),
                                  "top_k": np.array([top_k], np.int64), "noise": noise})[0]

    return run, rows, vocab, k_max


@pytest.mark.parametrize("temperature,top_k", [(0.8, 250), (0.7, 25), (1.3, 3), (1.0, 0), (1.0, 1000),
                                               (0.5, 1), (0.0, 25)])
def test_sampler_matches_numpy_reference(sampler, temperature, top_k):
    run, rows, vocab, k_max = sampler
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    noise = rng.exponential(size=(rows, vocab)).astype(np.float32)
    ours = run(logits, temperature, top_k, noise)
    assert (ours == reference_sample_top_k(logits, temperature, top_k, noise, k_max)).all()
    if top_k == 1 or temperature <= 0:
        assert (ours == logits.argmax(-1)).all()


def test_sampler_distribution_is_top_k_softmax(sampler):
    """Same logits on every row: token frequencies follow the renormalised top-k softmax."""
    run, rows, vocab, k_max = sampler
    rng = np.random.default_rng(8)
    logits = np.tile(rng.standard_normal(vocab).astype(np.float32) * 2, (rows, 1))
    noise = rng.exponential(size=(rows, vocab)).astype(np.float32)
    tokens = run(logits, 0.9, 5, noise)
    probs = np.exp(logits[0] / 0.9)
    top = np.argsort(-probs)[:5]
    expected = probs[top] / probs[top].sum()
    assert set(np.unique(tokens)) <= set(top.tolist())
    observed = np.array([(tokens == t).mean() for t in top])
    assert np.abs(observed - expected).max() < 0.03


# -- state machine details ------------------------------------------------------------------

def test_lm_state_priming_and_forcing():
    cfg = tiny_config().lm
    state = LMState.from_config(cfg)
    user = np.arange(AGENT)
    assert state.next_input(user=user) is None  # call 0 only primes the ring
    inp = state.next_input(user=user + 10, agent=np.arange(AGENT) + 100, text=5)
    assert inp.tokens.tolist() == [cfg.text_card] + [cfg.card] * cfg.n_q
    assert inp.text_forced and inp.text_token(9) == 5
    delayed = np.asarray(cfg.delays[1:]) > 0
    # Delay-0 streams hold this call's forced tokens, delayed streams the initial token.
    assert inp.audio_force_mask.all()
    assert inp.audio_targets[0] == 100 and inp.audio_targets[AGENT] == 10
    assert (inp.audio_targets[delayed] == cfg.card).all()
    assert state.commit(0, np.zeros(cfg.dep_q, np.int64)) is None
    inp = state.next_input(user=user + 20)
    assert not inp.text_forced and inp.text_token(9) == 9
    assert inp.tokens[0] == 5 and inp.tokens[1] == 100 and inp.tokens[1 + AGENT] == 10
    assert not inp.audio_force_mask[0] and inp.audio_force_mask[1:AGENT].all()  # delayed prompt tail
    frame = state.commit(42, np.full(cfg.dep_q, 7))
    assert frame[0] == 5 and frame[1] == 100 and frame[2:1 + AGENT].tolist() == list(range(101, 108))
    assert frame[1 + AGENT:].tolist() == (user + 10).tolist()
    with pytest.raises(ValueError, match="neither generated nor provided"):
        state.next_input()
        state.commit(1, np.zeros(AGENT, np.int64))
