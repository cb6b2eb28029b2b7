# The four Cambrian-1 towers with every grid interpolated to 576 tokens (24x24): what a channel-concatenating
# projector such as mlp2x_gelu needs (reference §B.7).
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
_token_lens = [576, 576, 576, 576]
