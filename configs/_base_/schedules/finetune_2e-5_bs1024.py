# Stage 2 for the 34B model (reference §C.5): connector + LLM at 2e-5, warmup 0.03, global batch 1024.
stage = "finetune"
optim = dict(type="AdamW", lr=2e-5, weight_decay=0.0, scale_lr_by_batch=True, base_batch_size=1024)
schedule = dict(
    epochs=1, warmup_ratio=0.03, scheduler="cosine", precision="bf16", gradient_checkpointing=True, clip_grad=1.0
)
checkpoint = dict(interval=2000, keep_last=1)
