# Stage 1 of reference §C.5: connector only; projectors and newline at 1e-3, SVA samplers and queries at 1e-4,
# warmup 0.06, cosine, one epoch, global batch 512 (the lr follows sqrt(batch / 512) at other batch sizes).
stage = "pretrain"
optim = dict(
    type="AdamW",
    lr=1e-3,
    weight_decay=0.0,
    lr_groups={"connector.vision_sampler*": 1e-4, "connector.vision_query": 1e-4},
    scale_lr_by_batch=True,
    base_batch_size=512,
)
# compile_connector=True roughly halves the SVA's step time on an H100 (docs/training.md; single / fsdp runners)
schedule = dict(
    epochs=1, warmup_ratio=0.06, scheduler="cosine", precision="bf16", gradient_checkpointing=True, clip_grad=1.0
)
checkpoint = dict(interval=1000, keep_last=1)
