"""codegeex2: CodeGeeX2-6B, the ChatGLM2 architecture (remote code, model_type "chatglm").

Facts: spec/mindformers_other.md §2.3 (names as glm-n, §2.2; no transforms; parameters float32).

Difference from MindFormers (its bug, §5.4): the embedding is written as
`transformer.embedding.embedding_weight`, the name the ChatGLM2 model has had since June 2024; MindFormers
writes `transformer.embedding.embedding_table`, which that model does not load (the embedding silently
stays at its random init). The reverse reads both names, so MindFormers' own files convert back too.
"""

from models.glm2.declaration import GLM_N

from mindformers_conv.registry import register

register(GLM_N.variant("codegeex2", "CodeGeeX2-6B (ChatGLM2 architecture)"))
