"""Model runtimes behind one interface (``protocol.Engine``).

- ``protocol``: the interfaces and typed results; ``ops``: the worker's requests, declared once.
- ``local``: ``LocalEngine``, evaluations in this process on any backend; ``pipeline``: its overlap.
- backends, one file each: ``llama`` (llama.cpp, only inside the worker) and ``fake`` (numpy).
- ``client``: ``WorkerEngine``, the same API over a worker process; ``worker``/``server``: that
  process; ``ipc``: its pipe; ``testing``: test-only operations.

Nothing is imported here: the worker must import ``llama_cpp`` before numpy.
"""
