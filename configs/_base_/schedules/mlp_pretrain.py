# Stage 1 with a plain projector (no SVA samplers): projector and newline at 1e-3, warmup 0.06, global batch 512.
stage = "pretrain"
optim = dict(type="AdamW", lr=1e-3, weight_decay=0.0, scale_lr_by_batch=True, base_batch_size=512)
schedule = dict(
    epochs=1, warmup_ratio=0.06, scheduler="cosine", precision="bf16", gradient_checkpointing=True, clip_grad=1.0
)
checkpoint = dict(interval=1000, keep_last=1)
