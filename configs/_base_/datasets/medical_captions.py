# Stage-1 alignment data: image-caption pairs (PMC figures and the like) converted by `cambrian convert` into
# LLaVA JSONL; set CAMBRIAN_DATA to the folder holding the converted sets (default ./data).
data = dict(
    train="{{$CAMBRIAN_DATA:data}}/medical_captions/records.jsonl",
    max_length=2048,
    batch_size=8,
    num_workers=4,
    group_by_length=True,
    val_fraction=0.002,
    pad_to_multiple_of=8,
)
