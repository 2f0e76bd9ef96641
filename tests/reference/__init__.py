"""The reference model: the numpy implementation of the engine's operations, kept as the
specification the compiled engine (shmreplay.engine._native) is held to by differential tests.

Each module here is the straightforward numpy version of one concern, written for clarity, not
speed. A differential test drives the same random operation sequence through the engine and the
model, with the same random numbers, and compares the results exactly.
"""
