# lmsys/vicuna-13b-v1.5 with the vicuna_v1 template (40 layers, hidden 5120). A local HF folder.
_llm = dict(type="vicuna", path="{{$CAMBRIAN_WEIGHTS:weights}}/vicuna-13b-v1.5", dtype="bfloat16")
