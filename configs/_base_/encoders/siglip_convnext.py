# Two towers only (the language-supervised pair of Cambrian-1): SigLIP SO400M/14@384 + ConvNeXt-XXL@1024.
_towers = [
    dict(
        type="siglip",
        model_name="vit_so400m_patch14_siglip_384",
        checkpoint="{{$CAMBRIAN_WEIGHTS:weights}}/siglip-so400m-patch14-384/open_clip_model.safetensors",
    ),
    dict(
        type="convnext",
        model_name="convnext_xxlarge",
        checkpoint="{{$CAMBRIAN_WEIGHTS:weights}}/convnext-xxlarge-clip/open_clip_model.safetensors",
        image_size=1024,
    ),
]
_token_lens = [576, 9216]
