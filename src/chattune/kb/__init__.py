"""Knowledge bases: read documents, split them, index the chunks, retrieve and prompt.

The langchain-ChatGLM (Langchain-Chatchat 0.2) pipeline on chattune's own pieces:
:mod:`~chattune.kb.documents` reads files, :mod:`~chattune.kb.splitter` cuts them into
overlapping chunks, :mod:`~chattune.kb.index` scores chunks against a question (BM25 or
dense embeddings), :mod:`~chattune.kb.store` keeps a self-describing KB folder and
searches it, and :mod:`~chattune.kb.prompt` turns the hits into the message sent to the
model (or the "cannot answer" reply when nothing is relevant enough).
"""
