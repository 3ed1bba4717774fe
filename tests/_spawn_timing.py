import time, sys, os
t0 = time.time()
import torch.multiprocessing as mp
import test_thermostat as T
def w(rank, t0, d):
    t1 = time.time()
    T._broadcast_worker(rank, 2, d + "/init", d)
    print(rank, "started after", t1 - t0, "done after", time.time() - t0, flush=True)
if __name__ == "__main__":
    import tempfile
    d = tempfile.mkdtemp()
    t0 = time.time()
    mp.spawn(w, args=(t0, d), nprocs=2)
    print("total", time.time() - t0)
