"""Files copied into a ``trust_remote_code`` export: ``configuration_cambrian.py`` and ``modeling_cambrian.py``.

They are not imported by cambrian itself; transformers loads them from the exported folder. The model code
imports the installed ``cambrian_core`` package and runs the very same model (same weights, same generate),
so an exported model's outputs equal the original's.
"""
