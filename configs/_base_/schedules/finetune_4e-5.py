# Stage 2 of reference §C.5 (8B and 13B): connector + LLM at 4e-5, warmup 0.03, cosine, one epoch, batch 512.
stage = "finetune"
optim = dict(type="AdamW", lr=4e-5, weight_decay=0.0, scale_lr_by_batch=True, base_batch_size=512)
schedule = dict(
    epochs=1, warmup_ratio=0.03, scheduler="cosine", precision="bf16", gradient_checkpointing=True, clip_grad=1.0
)
checkpoint = dict(interval=2000, keep_last=1)
