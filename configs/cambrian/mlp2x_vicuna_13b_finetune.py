# mlp2x_vicuna_13b_finetune: stage 2 (connector + LLM) with the seed recipe's settings (reference §C.5); one base per part.
_base_ = [
    "../_base_/encoders/cambrian_4towers_576.py",
    "../_base_/connectors/mlp2x_gelu.py",
    "../_base_/llms/vicuna_13b.py",
    "../_base_/datasets/medical_instruct.py",
    "../_base_/schedules/finetune_4e-5.py",
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
load_from = "work_dirs/mlp2x_vicuna_13b_pretrain/model"  # the stage-1 result
