"""Inference: the one service every entrance calls (`service`), the engine interface behind it
(`engine`), and the engines: in-process (`inprocess`) and the pool of worker processes (`pool`)."""
