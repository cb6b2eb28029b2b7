# The Cambrian-1 tower set (reference §B.1): SigLIP SO400M/14@384, CLIP ViT-L/14@336, DINOv2-giant@378 and
# ConvNeXt-XXL@1024 (multi-stage), token lengths [576, 576, 576, 9216]. Weights are read from local files only:
# set CAMBRIAN_WEIGHTS to the folder that holds them (default ./weights), see docs/training.md.
_towers = [
    dict(
        type="siglip",
        model_name="vit_so400m_patch14_siglip_384",
        checkpoint="{{$CAMBRIAN_WEIGHTS:weights}}/siglip-so400m-patch14-384/open_clip_model.safetensors",
    ),
    dict(type="clip", path="{{$CAMBRIAN_WEIGHTS:weights}}/clip-vit-large-patch14-336", select_layer=-2),
    dict(type="dinov2", path="{{$CAMBRIAN_WEIGHTS:weights}}/dinov2-giant", image_size=378),
    dict(
        type="convnext",
        model_name="convnext_xxlarge",
        checkpoint="{{$CAMBRIAN_WEIGHTS:weights}}/convnext-xxlarge-clip/open_clip_model.safetensors",
        image_size=1024,
    ),
]
_token_lens = [576, 576, 576, 9216]
