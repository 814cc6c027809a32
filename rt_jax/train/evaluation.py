"""Downstream evaluation: an lm-eval ``LM`` over our run directories and reference checkpoints.

``RtJaxLM`` (registered with lm-eval as ``rt-jax``) scores requests with the generic model entry
points, so every family works the same way: ``loglikelihood`` and ``loglikelihood_rolling`` run
``rt_jax.models.lm.forward`` (for LRT the exact token-by-token recurrence) on right-padded
batches and sum the log-softmax of the continuation tokens; ``generate_until`` runs
``rt_jax.generate`` (prefill + KV-cache decoding). ``heldout_perplexity`` is the per-token
cross-entropy of a data config's validation split through ``eval_sums`` (what training reports
as ``val_ce``).

    import lm_eval, rt_jax.train.evaluation  # registers "rt-jax"
    lm_eval.simple_evaluate(model="rt-jax", model_args="checkpoint=runs/x,batch_size=16",
                            tasks=["piqa"])

``load_checkpoint`` reads a run directory (``config.json`` + Orbax ``checkpoints/``) or a
reference-format directory (``config.yaml`` + ``model.safetensors``, see ``rt_jax.convert``); the
latter has no data config, so a preset (and ``data.*`` overrides) names its tokenizer.
``SUITES`` lists the downstream tasks the three papers report (see docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

import rt_jax
from rt_jax import convert
from rt_jax.config import ModelConfig
from rt_jax.data import DataConfig, Tokenizer, build_tokenizer, make_iterator
from rt_jax.models.lm import LanguageModel, eval_sums, forward
from rt_jax.train.checkpoint import CHECKPOINT_DIR, CONFIG_FILE, load_model
from rt_jax.train.config import apply_overrides, get_preset

PyTree = Any

_MESH_TASKS = (
    "lambada_openai",
    "lambada_standard",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "sciq",
    "mmlu_continuation",
)
SUITES: dict[str, dict[str, Any]] = {
    "rt": {
        "tasks": [
            "piqa",
            "hellaswag",
            "winogrande",
            "openbookqa",
            "sciq",
            "arc_easy",
            "copa",
            "rte",
            "cb",
            "mrpc",
            "sst2",
        ],
        "num_fewshot": 0,
        "source": "RT reference code: the downstream evaluators (commented out) of its base "
        "YAML; the tasks and numbers of the paper's App. E.4 are not known",
    },
    "mesh-0shot": {
        "tasks": list(_MESH_TASKS),
        "num_fewshot": 0,
        "source": "MeSH App. B: 9 lm-eval tasks, 0-shot (acc_norm for PIQA, HellaSwag, ARC-E, "
        "ARC-C, SciQ; acc for LAMBADA, WinoGrande, cMMLU)",
    },
    "mesh-5shot": {
        "tasks": list(_MESH_TASKS),
        "num_fewshot": 5,
        "source": "MeSH App. B: the same 9 tasks, 5-shot",
    },
    "mesh-ppl": {
        "tasks": ["wikitext", "lambada_openai", "lambada_standard"],
        "num_fewshot": 0,
        "source": "MeSH perplexities (Wikitext, LAMBADA-OpenAI/Standard); its Pile-validation "
        "perplexity is the held-out perplexity of the training data (--perplexity)",
    },
}
"""Downstream suites of the papers, for users with the datasets (lm-eval downloads them).

LRT reports DCLM's CORE in-context-learning score, which lm-eval does not implement; it has no
suite here (its BPB is the held-out perplexity in bits)."""


# ----------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model ready to evaluate, the data config its tokenizer and held-out split come from,
    and what was loaded (``kind``: "run" or "reference"; ``step`` for runs)."""

    model: LanguageModel
    data: DataConfig
    kind: str
    path: str
    step: int | None = None
    max_length: int | None = None


def _runtime(config: ModelConfig, impl: str | None, interpret: bool | None, dtype: str | None):
    changes = {
        name: value
        for name, value in (("impl", impl), ("interpret", interpret), ("compute_dtype", dtype))
        if value is not None
    }
    return dataclasses.replace(config, **changes) if changes else config


def _check_data_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        if not item.strip().startswith("data."):
            raise ValueError(
                f"override {item!r}: evaluation takes data.* overrides only (the tokenizer and "
                "held-out split); the model comes from the checkpoint"
            )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    impl: str | None = None,
    interpret: bool | None = None,
    compute_dtype: str | None = None,
) -> Loaded:
    """The model and data config of a run directory or a reference-format checkpoint directory.

    ``overrides`` are ``data.field=value`` strings (e.g. ``data.tokenizer=sentencepiece``);
    ``impl``/``interpret``/``compute_dtype`` change how the model runs, not its weights. A
    reference checkpoint needs ``preset`` (whose data section gives the tokenizer).
    """
    path = os.fspath(path)
    _check_data_overrides(overrides)
    if os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, CHECKPOINT_DIR)
    ):
        model, cfg = load_model(path, step=step)
        if preset is not None:
            raise ValueError(f"{path} is a run directory with its own config: drop preset")
        cfg = apply_overrides(cfg, list(overrides))
        config = _runtime(model.config, impl, interpret, compute_dtype)
        loaded_step = step if step is not None else _latest_step(path)
        return Loaded(
            LanguageModel(config, params=model.params()), cfg.data, "run", path, loaded_step
        )
    if convert.is_olmo_dir(path):
        if step is not None:
            raise ValueError(f"{path} is a reference checkpoint (one step): drop step")
        if preset is None:
            raise ValueError(
                f"{path} is a reference checkpoint without a data config: pass a preset whose "
                "data section names the tokenizer (and data.* overrides, e.g. "
                "data.tokenizer=sentencepiece,data.sentencepiece_model=PATH)"
            )
        olmo_config, state = convert.load_olmo(path)
        model = convert.from_olmo(
            olmo_config,
            state,
            impl=impl or "tiled",
            interpret=bool(interpret),
            compute_dtype=compute_dtype or "float32",
        )
        cfg = apply_overrides(get_preset(preset), list(overrides))
        max_len = olmo_config.get("max_sequence_length")
        return Loaded(model, cfg.data, "reference", path, None, max_len)
    raise ValueError(
        f"{path} is neither a run directory ({CONFIG_FILE} + {CHECKPOINT_DIR}/) nor a reference "
        f"checkpoint ({convert.OLMO_CONFIG_FILE} + {convert.OLMO_WEIGHTS_FILE})"
    )


def _latest_step(run_dir: str) -> int | None:
    steps = [int(p) for p in os.listdir(os.path.join(run_dir, CHECKPOINT_DIR)) if p.isdigit()]
    return max(steps) if steps else None


# ----------------------------------------------------------------------------- scoring
@functools.partial(jax.jit, static_argnames=("config",))
def _target_scores(
    params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """log p(target_t | inputs_<=t) over the real vocabulary and whether it is the argmax."""
    logits = forward(params, inputs_BxN, config)[..., : config.vocab_size]
    logp_BxNxV = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_lp = jnp.take_along_axis(logp_BxNxV, targets_BxN[..., None], axis=-1)[..., 0]
    return target_lp, jnp.argmax(logits, axis=-1) == targets_BxN


def _bucket(n: int, cap: int) -> int:
    """The padded width for a batch whose longest row has n tokens: a power of two (>= 8)."""
    return min(max(8, 1 << (n - 1).bit_length()), cap)


def score_continuations(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    max_length: int,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy) for each (context, continuation) pair.

    The model reads context + continuation minus its last token, cut from the left to
    ``max_length``; ``greedy`` says whether every continuation token is the argmax. Rows are
    sorted by length, right-padded to a power-of-two width and batched ``batch_size`` at a time
    (short batches padded with dummy rows), so few shapes compile.
    """
    if not pairs:
        return []
    rows = []
    for i, (context, continuation) in enumerate(pairs):
        if len(continuation) == 0:
            raise ValueError(f"request {i}: the continuation encodes to no tokens")
        if len(continuation) > max_length:
            raise ValueError(
                f"request {i}: the continuation has {len(continuation)} tokens, more than "
                f"max_length={max_length}"
            )
        full = list(context) + list(continuation)
        if len(context) == 0:
            raise ValueError(f"request {i}: the context is empty (prefix it with a token)")
        full = full[-(max_length + 1) :]
        rows.append((np.asarray(full, np.int32), len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    params, config = model.params(), model.config
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, disable=not progress, desc="loglikelihood"):
        width = _bucket(max(len(rows[i][0]) - 1 for i in batch), max_length)
        inputs = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(batch):
            full = rows[i][0]
            inputs[r, : len(full) - 1] = full[:-1]
            targets[r, : len(full) - 1] = full[1:]
        lp, greedy = jax.device_get(
            _target_scores(params, jnp.asarray(inputs), jnp.asarray(targets), config)
        )
        for r, i in enumerate(batch):
            full, n_cont = rows[i]
            end = len(full) - 1
            span = slice(end - n_cont, end)
            results[i] = (
                float(np.sum(lp[r, span], dtype=np.float64)),
                bool(np.all(greedy[r, span])),
            )
    return results  # type: ignore[return-value]


def heldout_perplexity(
    model: Any, data: DataConfig, *, max_batches: int | None = None
) -> dict[str, float]:
    """Per-token cross-entropy (nats) and perplexity of ``data``'s validation split.

    ``ce`` is the exact model's (``eval_sums``' ``ce_sum``, as in training's ``val_ce``); a
    family's extra sums (LRT: ``ce_parallel``) are reported as ``ce_<name>``. ``max_batches``
    caps the batches read (None: the whole split, one pass).
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    config = model.config
    params = model.params()

    @jax.jit
    def sums(params: PyTree, tokens: jax.Array) -> dict[str, jax.Array]:
        return eval_sums(params, tokens[:, :-1], tokens[:, 1:], config)

    totals: dict[str, float] = {}
    tokens = 0
    it = make_iterator(data, "validation", num_epochs=1)
    for n, batch in enumerate(it):
        if max_batches is not None and n >= max_batches:
            break
        out = jax.device_get(sums(params, jnp.asarray(batch["tokens"])))
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        tokens += batch["tokens"][:, 1:].size
    if tokens == 0:
        raise ValueError("the validation split gave no full batch: lower data.batch_size")
    result: dict[str, float] = {"tokens": float(tokens)}
    for key, value in totals.items():
        name = "ce" + key.removeprefix("ce_sum")
        result[name] = value / tokens
    result["ppl"] = math.exp(result["ce"])
    return result


# ----------------------------------------------------------------------------- the lm-eval LM
def _kwargs_overrides(kwargs: dict[str, Any]) -> list[str]:
    """``data.x=y`` overrides from lm-eval model_args keys such as ``data.tokenizer``."""
    out = []
    for key, value in kwargs.items():
        if not key.startswith("data."):
            raise ValueError(
                f"unknown rt-jax model_args key {key!r}: expected checkpoint, step, preset, "
                "batch_size, max_length, impl, interpret, compute_dtype, seed or data.<field>"
            )
        out.append(f"{key}={value}")
    return out


@register_model("rt-jax")
class RtJaxLM(TemplateLM):
    """lm-eval's ``LM`` for any rt-jax model (see the module docstring).

    Build it from a checkpoint (``checkpoint=PATH`` and the options of ``load_checkpoint``) or
    from objects (``model=LanguageModel, tokenizer=Tokenizer``). ``max_length`` is the longest
    input the model reads (default: the reference config's ``max_sequence_length`` or the data
    config's ``seq_len``); longer contexts are cut from the left.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        model: Any = None,
        tokenizer: Tokenizer | None = None,
        step: int | None = None,
        preset: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        impl: str | None = None,
        interpret: bool | None = None,
        compute_dtype: str | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,
        device: str | None = None,
        **data_overrides: Any,
    ) -> None:
        super().__init__()
        del max_batch_size, device  # lm-eval passes these; JAX places arrays itself
        if (checkpoint is None) == (model is None):
            raise ValueError("pass either checkpoint=PATH or model=... (with tokenizer=...)")
        if checkpoint is not None:
            loaded = load_checkpoint(
                checkpoint,
                step=step,
                preset=preset,
                overrides=_kwargs_overrides(data_overrides),
                impl=impl,
                interpret=interpret,
                compute_dtype=compute_dtype,
            )
            model = loaded.model
            tokenizer = build_tokenizer(loaded.data)
            max_length = max_length or loaded.max_length or loaded.data.seq_len
        elif tokenizer is None or max_length is None:
            raise ValueError("with model=..., pass tokenizer=... and max_length=...")
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} entries but the model's vocab_size is "
                f"{model.config.vocab_size}: pass the tokenizer the model was trained with "
                "(data.* overrides)"
            )
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8
        self.model = model
        self.tok = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length)
        self.seed = int(seed)
        if self.batch_size < 1 or self._max_length < 2:
            raise ValueError(
                f"batch_size={self.batch_size} must be >= 1 and max_length={self._max_length} >= 2"
            )

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's EOS id (documents are separated by it in training)."""
        return int(self.tok.eos_id)

    @property
    def max_length(self) -> int:
        """The longest input (tokens) the model reads."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """Identifies the tokenizer in lm-eval's request cache."""
        return type(self.tok).__name__

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Token ids of ``string`` (no EOS or BOS added)."""
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: Iterable[int], **kwargs) -> str:
        """Text of token ids."""
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        out = score_continuations(
            self.model,
            pairs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            progress=not disable_tqdm,
        )
        for (key, _, _), result in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), in disjoint max_length windows."""
        pairs, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(lm_utils.make_disjoint_window, windows):
                pairs.append(window)
                owner.append(n)
        scores = score_continuations(
            self.model,
            pairs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            progress=not disable_tqdm,
        )
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, scores, strict=True):
            totals[n] += lp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations generated with the KV cache, cut before the first ``until`` string."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(n)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
            temperature = temperature if do_sample else 0.0
            top_p = gen_kwargs.pop("top_p", None)
            top_k = gen_kwargs.pop("top_k", None)
            keep = max(1, self.max_length - max_new)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                prompts = []
                for n in batch:
                    ids = self.tok_encode(requests[n].args[0]) or [self.prefix_token_id]
                    prompts.append(ids[-keep:])
                prompts += [[self.prefix_token_id]] * (self.batch_size - len(batch))
                out = rt_jax.generate(
                    self.model,
                    prompts,
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p),
                    seed=self.seed,
                    stop_tokens=(self.eot_token_id,),
                )
                for r, n in enumerate(batch):
                    text = self.tok_decode(out.tokens[r, : int(out.lengths[r])])
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]
