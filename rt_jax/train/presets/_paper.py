"""The paper's C4 recipe shared by ``paper-150m`` and ``paper-300m``."""

from rt_jax.config import ModelConfig
from rt_jax.data.config import DataConfig
from rt_jax.train.config import ModelPoint, TrainConfig, point_model

T5_SENTENCEPIECE = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"


def points(shapes: tuple[tuple[int, int, int, int], ...]) -> tuple[ModelPoint, ...]:
    """Both block types at each (layers, width, heads, mlp) shape."""
    return tuple(
        ModelPoint(f"{block}-{layers}L", block, layers, width, heads, mlp)
        for block in ("transformer", "recurrent")
        for layers, width, heads, mlp in shapes
    )


def paper_config(steps: int, compare: tuple[ModelPoint, ...]) -> TrainConfig:
    """512 x 512 tokens per step on C4 with T5's vocabulary (32100 padded to 32128), bf16 compute,
    AdamW(0.9, 0.95, 1e-8, wd 0), clip 1.0, warmup from 0.1 lr over 40% then cosine to 0.1 lr.

    The reference swept lr over {1e-3, 3.16e-3, 1e-2} and b2 over {0.95, 0.99}; the preset takes
    lr 1e-3 and b2 0.95 (override with ``--set lr=...``). Eight microbatches of 64 sequences keep
    the logits of one microbatch small; one microbatch of 512 (as the reference RT run) is
    ``--set microbatches=1``. Transformer blocks use the platform's fused attention
    (``attention="flash"``: Pallas flash attention on TPU, cuDNN on GPU).
    """
    return TrainConfig(
        model=point_model(
            ModelConfig(
                vocab_size=32100,
                embedding_size=32128,
                impl="tiled",
                compute_dtype="bfloat16",
                attention="flash",
            ),
            compare[0],
        ),
        data=DataConfig(
            corpus="c4",
            tokenizer="sentencepiece",
            sentencepiece_model=T5_SENTENCEPIECE,
            extra_ids=100,
            seq_len=512,
            batch_size=512,
        ),
        steps=steps,
        lr=1e-3,
        microbatches=8,
        log_every=50,
        eval_points=10,
        eval_batches=64,
        checkpoint_every=1000,
        keep_checkpoints=2,
        compare=compare,
        seeds=(0,),
    )
