# Stage 1 for the 34B model: as sva_pretrain, at the global batch of 1024 of reference §C.5.
stage = "pretrain"
optim = dict(
    type="AdamW",
    lr=1e-3,
    weight_decay=0.0,
    lr_groups={"connector.vision_sampler*": 1e-4, "connector.vision_query": 1e-4},
    scale_lr_by_batch=True,
    base_batch_size=1024,
)
schedule = dict(
    epochs=1, warmup_ratio=0.06, scheduler="cosine", precision="bf16", gradient_checkpointing=True, clip_grad=1.0
)
checkpoint = dict(interval=1000, keep_last=1)
