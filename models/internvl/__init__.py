"""InternVL 2.5 / 3: HF (remote-code InternVLChatModel) ↔ MindSpeed-MM Megatron layout."""
