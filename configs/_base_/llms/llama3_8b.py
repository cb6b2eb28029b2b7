# Meta-Llama-3-8B-Instruct with the llama_3 template (32 layers, hidden 4096). A local HF folder.
_llm = dict(type="llama3", path="{{$CAMBRIAN_WEIGHTS:weights}}/Meta-Llama-3-8B-Instruct", dtype="bfloat16")
