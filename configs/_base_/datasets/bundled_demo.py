# The demo data shipped by installed packages (pydicom-data, scikit-image, torchxrayvision), written by
#   cambrian convert bundled_demo --src . --out data/bundled_demo
data = dict(
    train="{{$CAMBRIAN_DATA:data}}/bundled_demo/records.jsonl",
    max_length=512,
    batch_size=4,
    num_workers=0,
    group_by_length=True,
    val_fraction=0.1,
)
