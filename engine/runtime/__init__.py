"""Worker runtime: drives one EngineCore inside a worker process (loop thread, token streams,
load snapshot, histograms, thread setup). Shared by every worker kind; no copies."""
