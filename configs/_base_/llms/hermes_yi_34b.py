# NousResearch/Nous-Hermes-2-Yi-34B with the chatml_direct template (60 layers, hidden 7168). A local HF folder.
_llm = dict(type="hermes_yi", path="{{$CAMBRIAN_WEIGHTS:weights}}/Nous-Hermes-2-Yi-34B", dtype="bfloat16")
