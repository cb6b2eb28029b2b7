# Ablation: two towers (SigLIP + ConvNeXt) instead of four; differs from sva_llama3_8b_pretrain by the encoders base.
_base_ = [
    "../_base_/encoders/siglip_convnext.py",
    "../_base_/connectors/sva_32layers.py",
    "../_base_/llms/llama3_8b.py",
    "../_base_/datasets/medical_captions.py",
    "../_base_/schedules/sva_pretrain.py",
    "../_base_/runtime/fsdp_bf16.py",
]
model = dict(
    type="cambrian",
    vision_tower_aux_list={{_base_._towers}},
    vision_tower_aux_token_len_list={{_base_._token_lens}},
    image_token_len=576,
    connector={{_base_._connector}},
    llm={{_base_._llm}},
)
