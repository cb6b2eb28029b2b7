# LLaVA-1.5's projector: the towers' tokens concatenated along channels, Linear -> GELU -> Linear (reference §B.7).
_connector = dict(type="mlp2x_gelu")
