import torch

from engine.runtime.threads import set_threads_for_cpu_share


def test_thread_count_follows_the_cpu_share_rounded_down_at_least_one():
    before = torch.get_num_threads()
    try:
        assert set_threads_for_cpu_share(0.5) == 1 == torch.get_num_threads()
        assert set_threads_for_cpu_share(2.9) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
