"""Formats of the outside world: LLaVA / PDS-DPO JSON (`llava_json`) and LLaVA-1.5's conversation prompt
(`llava_conversation`)."""
