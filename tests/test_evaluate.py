"""Downstream evaluation: the lm-eval adapter's scores equal scores computed by hand from logits.

The oracle is the definition: log p(continuation | context) = sum over the continuation tokens of
log_softmax(logits)[token] (float64, over the real vocabulary) from one unpadded forward of
context + continuation[:-1]; ``greedy`` = every continuation token is the argmax. Rolling
(perplexity) scores split the text into disjoint windows of max_length predicted tokens, each
read with at most max_length inputs; generation is greedy argmax by repeated full forwards.
Everything runs offline on the small tasks under tests/data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets / huggingface_hub load
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grain  # noqa: E402
import jax  # noqa: E402
import lm_eval  # noqa: E402  (the test extra: pip install -e .[test])
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from rt_jax.data import ByteTokenizer, DataConfig  # noqa: E402
from rt_jax.models.lm import LanguageModel, forward  # noqa: E402
from rt_jax.train import evaluation  # noqa: E402
from rt_jax.train.checkpoint import CONFIG_FILE, Checkpointer  # noqa: E402
from rt_jax.train.config import apply_overrides, get_preset, save_config, with_point  # noqa: E402
from rt_jax.train.optim import make_optimizer  # noqa: E402
from rt_jax.train.step import init_state  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BYTE = ByteTokenizer()


# ----------------------------------------------------------------------------- models
def _small(point):
    """A compare point of a preset at a test size (family options kept, width 32)."""
    return dataclasses.replace(point, d_model=32, n_heads=2, mlp_hidden=64)


def family_config(family: str):
    """The tiny preset (bytes, seq_len 32) with a model of the named family."""
    tiny = apply_overrides(get_preset("tiny"), ["seed=3"])
    if family in ("transformer", "recurrent"):
        return apply_overrides(tiny, [f"model.block_type={family}"])
    preset = {"lrt": "cpu-lrt", "mesh": "cpu-mesh"}[family]
    points = get_preset(preset).compare
    wanted = {"lrt": "lrt-layerwise", "mesh": "mesh"}[family]
    (point,) = [p for p in points if p.family_name == wanted]
    cfg = with_point(tiny, _small(point), 3)
    assert cfg.model.family == {"lrt": "lrt", "mesh": "recursive"}[family]
    return cfg


def write_run(path: pathlib.Path, cfg) -> dict:
    """A run directory (config.json + one checkpoint) as the trainer writes it; its params."""
    save_config(cfg, path / CONFIG_FILE)
    state = init_state(cfg, make_optimizer(cfg))
    ckpt = Checkpointer(path, cfg)
    ckpt.save(5, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
    ckpt.close()
    return state["params"]


@pytest.fixture(scope="module")
def rt_run(tmp_path_factory):
    """A recurrent-model run directory and the model it holds."""
    cfg = family_config("recurrent")
    path = tmp_path_factory.mktemp("rt_run")
    params = write_run(path, cfg)
    return path, LanguageModel(cfg.model, params=params)


@pytest.fixture
def offline_tasks(monkeypatch, tmp_path):
    """Run from the repo root (the task YAMLs name tests/data/*.jsonl) with a private HF cache."""
    import datasets

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return TaskManager(include_path=str(DATA), include_defaults=False)


# ----------------------------------------------------------------------------- oracle
WIDTH = 32  # every oracle forward reads this many positions (one compile per model)


def log_softmax64(logits_NxV: np.ndarray) -> np.ndarray:
    x = logits_NxV.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


ROWS = 8  # ... and this many rows: one compile of the jitted forward per model
_forward = jax.jit(forward, static_argnums=2)


def oracle_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    """Float64 logits over the real vocabulary at every position of each sequence. The model is
    causal (tests/test_causality.py), so each sequence is read in a (ROWS, WIDTH) batch filled
    with random tokens, which positions < len(sequence) cannot see."""
    rng = np.random.default_rng(123)
    out = []
    for start in range(0, len(sequences), ROWS):
        chunk = sequences[start : start + ROWS]
        rows = rng.integers(0, model.config.vocab_size, (ROWS, WIDTH)).astype(np.int32)
        for r, seq in enumerate(chunk):
            assert 0 < len(seq) <= WIDTH
            rows[r, : len(seq)] = seq
        logits = np.asarray(_forward(model.params(), rows, model.config), np.float64)
        out += [logits[r, : len(seq), : model.config.vocab_size] for r, seq in enumerate(chunk)]
    return out


def oracle_loglikelihoods(model, pairs) -> list[tuple[float, bool]]:
    """Per (context, continuation): the sum of log p(continuation tokens) given everything before
    them, and whether each is the argmax; inputs are context + continuation[:-1]."""
    logits = oracle_logits(model, [list(c) + list(k)[:-1] for c, k in pairs])
    out = []
    for (context, continuation), lg in zip(pairs, logits, strict=True):
        lp = log_softmax64(lg)
        total, greedy = 0.0, True
        for j, token in enumerate(continuation):
            pos = len(context) - 1 + j  # the input position whose output predicts this token
            total += lp[pos, token]
            greedy &= int(np.argmax(lg[pos])) == token
        out.append((total, greedy))
    return out


def oracle_rolling(model, tokens: list[int], max_length: int, prefix: int) -> float:
    """Disjoint windows of max_length predicted tokens; each window's model input is the (at
    most) max_length tokens before its last prediction, the prefix token before the text."""
    seq = [prefix] + tokens  # seq[t + 1] = tokens[t]
    windows = []
    for p in range(0, len(tokens), max_length):
        e = min(p + max_length, len(tokens))
        windows.append((p, e, max(0, e - max_length)))  # predicts tokens[p:e] from seq[a:e]
    logits = oracle_logits(model, [seq[a:e] for _, e, a in windows])
    total = 0.0
    for (p, e, a), lg in zip(windows, logits, strict=True):
        lp = log_softmax64(lg)
        for t in range(p, e):
            total += lp[t - a, tokens[t]]  # tokens[t] = seq[t + 1] is predicted at input t - a
    return total


def oracle_greedy(model, prompts: list[list[int]], steps: int, stop: int) -> list[list[int]]:
    """Greedy continuations by full forwards of the growing sequences (no cache); a row stops
    after emitting ``stop``."""
    seqs, outs = [list(p) for p in prompts], [[] for _ in prompts]
    for _ in range(steps):
        logits = oracle_logits(model, seqs)
        for seq, out, lg in zip(seqs, outs, logits, strict=True):
            if out and out[-1] == stop:
                continue
            token = int(np.argmax(lg[-1]))
            out.append(token)
            seq.append(token)
    return outs


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", ["transformer", "recurrent", "lrt", "mesh"])
def test_score_continuations_equal_the_oracle_for_every_family(family):
    cfg = family_config(family)
    model = LanguageModel(cfg.model, params=init_state(cfg, make_optimizer(cfg))["params"])
    rng = np.random.default_rng(0)
    context = list(rng.integers(0, 257, 7))
    (greedy_token,) = oracle_greedy(model, [context], 1, stop=-1)[0]
    pairs = [
        (context, [greedy_token]),  # the model's own argmax: greedy
        (context, list(rng.integers(0, 257, 5))),
        (list(rng.integers(0, 257, 30)), list(rng.integers(0, 257, 6))),  # cut to 33 tokens
    ]
    # batches of 2 sorted by length: widths 32 and 8
    got = evaluation.score_continuations(model, pairs, batch_size=2, max_length=32)
    cut = [(c[-(33 - len(k)) :], k) for c, k in pairs]  # the context is cut from the left
    want = oracle_loglikelihoods(model, cut)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want] == [True, False, False]


def test_lm_eval_tasks_score_as_the_oracle(rt_run, offline_tasks):
    """loglikelihood (multiple choice), loglikelihood_rolling and generate_until through
    lm_eval.simple_evaluate with the registered "rt-jax" model, against the oracle."""
    path, model = rt_run
    out = lm_eval.simple_evaluate(
        model="rt-jax",
        model_args=f"checkpoint={path},batch_size=3",
        tasks=["rtjax_tiny_mc", "rtjax_tiny_ppl", "rtjax_tiny_gen"],
        task_manager=offline_tasks,
        log_samples=True,
    )
    samples = out["samples"]
    eos = BYTE.eos_id
    # multiple choice: context bytes, then " " + choice (lm-eval's target delimiter)
    correct = []
    for s in samples["rtjax_tiny_mc"]:
        doc = s["doc"]
        pairs = [(BYTE.encode(doc["context"]), BYTE.encode(" " + c)) for c in doc["choices"]]
        want = oracle_loglikelihoods(model, [(c[-(33 - len(k)) :], k) for c, k in pairs])
        got = [tuple(r) for r in s["filtered_resps"]]
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
        assert [bool(g[1]) for g in got] == [w[1] for w in want]
        correct.append(int(np.argmax([w[0] for w in want])) == doc["label"])
    assert out["results"]["rtjax_tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    # perplexity: max_length = the run's seq_len (32); the texts span 2-4 windows
    total_lp, total_bytes = 0.0, 0
    for s in samples["rtjax_tiny_ppl"]:
        text = s["doc"]["text"]
        want = oracle_rolling(model, BYTE.encode(text), 32, eos)
        np.testing.assert_allclose(float(s["filtered_resps"][0]), want, rtol=1e-5, atol=1e-3)
        total_lp += want
        total_bytes += len(text.encode())
    bpb = -total_lp / total_bytes / np.log(2)
    assert out["results"]["rtjax_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)
    # generation: greedy bytes (6 at most, EOS stops) after the prompt's last 32 - 6 bytes,
    # cut at "\n" or "."
    check_generations(model, samples["rtjax_tiny_gen"])


def check_generations(model, samples, max_length=32, max_new=6):
    prompts = [BYTE.encode(s["doc"]["context"])[-(max_length - max_new) :] for s in samples]
    outs = oracle_greedy(model, prompts, max_new, stop=BYTE.eos_id)
    for s, ids in zip(samples, outs, strict=True):
        assert s["filtered_resps"][0] == BYTE.decode(ids).split("\n")[0].split(".")[0]


def test_generate_until_uses_the_cache_for_lrt(tmp_path, offline_tasks):
    """LRT decodes with its memory carried in the cache (recursive models' cached decoding is
    held to their forward in tests/test_recursive.py; their scores are checked above)."""
    cfg = family_config("lrt")
    params = write_run(tmp_path, cfg)
    model = LanguageModel(cfg.model, params=params)
    lm = evaluation.RtJaxLM(checkpoint=str(tmp_path), batch_size=2)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["rtjax_tiny_gen"], task_manager=offline_tasks, log_samples=True
    )
    check_generations(model, out["samples"]["rtjax_tiny_gen"])


def test_heldout_perplexity_equals_the_oracle(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("It was the best of times, it was the worst of times. " * 4)
    (texts / "b.txt").write_text("Call me Ishmael. Some years ago, never mind how long. " * 3)
    data = DataConfig(
        corpus="text", text_dir=str(texts), data_dir=str(tmp_path / "d"), seq_len=16, batch_size=2
    )
    cfg = dataclasses.replace(family_config("recurrent"), data=data)
    model = LanguageModel(cfg.model, params=init_state(cfg, make_optimizer(cfg))["params"])
    got = evaluation.heldout_perplexity(model, data)
    from rt_jax.data import make_iterator

    nll, n = 0.0, 0
    for batch in make_iterator(data, "validation", num_epochs=1):
        rows = np.asarray(batch["tokens"])
        for row, lg in zip(rows, oracle_logits(model, [list(r[:-1]) for r in rows]), strict=True):
            nll -= log_softmax64(lg)[np.arange(16), row[1:]].sum()
            n += 16
    assert n > 0 and got["tokens"] == n
    assert got["ce"] == pytest.approx(nll / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(nll / n), rel=1e-5)


def test_reference_checkpoint_evaluates_like_the_run(rt_run, tmp_path):
    """A run exported with to_olmo and loaded back (with a preset for the tokenizer) scores the
    same; bad inputs name what to change."""
    from rt_jax.convert import to_olmo

    path, model = rt_run
    to_olmo(model, str(tmp_path / "ref"))
    loaded = evaluation.load_checkpoint(tmp_path / "ref", preset="tiny")
    assert loaded.kind == "reference" and loaded.data.tokenizer == "byte"
    pairs = [(BYTE.encode("To be, or"), BYTE.encode(" not"))]
    a = evaluation.score_continuations(model, pairs, batch_size=1, max_length=32)
    b = evaluation.score_continuations(loaded.model, pairs, batch_size=1, max_length=32)
    # The export carries no leaf size (an implementation detail): the loaded model runs the
    # default leaf, the same function up to float32 rounding.
    assert [greedy for _, greedy in a] == [greedy for _, greedy in b]
    assert [lp for lp, _ in a] == pytest.approx([lp for lp, _ in b], rel=1e-6)
    with pytest.raises(ValueError, match="preset"):
        evaluation.load_checkpoint(tmp_path / "ref")
    with pytest.raises(ValueError, match="data.. overrides only"):
        evaluation.load_checkpoint(path, overrides=["model.d_model=64"])
    with pytest.raises(ValueError, match="neither a run directory"):
        evaluation.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        evaluation.RtJaxLM(model=model, tokenizer=_OtherVocab(), max_length=32)
    with pytest.raises(ValueError, match="unknown rt-jax model_args key"):
        evaluation.RtJaxLM(checkpoint=str(path), pretrained="gpt2")


class _OtherVocab(ByteTokenizer):
    vocab_size = 300


def test_suites_name_lm_eval_tasks():
    """Every task of the papers' suites is declared by a YAML that lm-eval ships."""
    import re

    root = pathlib.Path(lm_eval.__file__).parent / "tasks"
    declared = set()
    for yaml_file in root.rglob("*.yaml"):
        declared |= set(re.findall(r"^(?:task|group): *(\S+) *$", yaml_file.read_text(), re.M))
    for name, suite in evaluation.SUITES.items():
        missing = [t for t in suite["tasks"] if t not in declared]
        assert not missing, f"suite {name}: {missing} are not lm-eval tasks"


def test_cli_scores_a_local_task_and_perplexity_inputs_are_checked(rt_run, offline_tasks, tmp_path):
    from experiments import evaluate as cli

    path, model = rt_run
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(path), "--include-path", "tests/data", "--no-default-tasks"]
    argv += ["--batch-size", "3"]
    assert cli.main(argv + ["--tasks", "rtjax_tiny_mc", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "run" and result["step"] == 5 and result["family"] == "standard"
    assert "--tasks rtjax_tiny_mc" in result["command"]
    correct = []
    for line in (DATA / "rtjax_tiny_mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        pairs = [(BYTE.encode(doc["context"]), BYTE.encode(" " + c)) for c in doc["choices"]]
        want = oracle_loglikelihoods(model, [(c[-(33 - len(k)) :], k) for c, k in pairs])
        correct.append(int(np.argmax([w[0] for w in want])) == doc["label"])
    acc = result["lm_eval"]["results"]["rtjax_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(np.mean(correct))
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(path)])  # nothing to evaluate
