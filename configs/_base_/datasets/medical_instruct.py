# Stage-2 instruction data: the medical instruction mix (VQA, reports, captions-as-chat) in LLaVA JSONL.
data = dict(
    train="{{$CAMBRIAN_DATA:data}}/medical_instruct/records.jsonl",
    max_length=2048,
    batch_size=8,
    num_workers=4,
    group_by_length=True,
    val_fraction=0.002,
    pad_to_multiple_of=8,
)
