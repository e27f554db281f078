"""The realistic benchmark's choice between its training arms in one process and one at a time, against memory
figures worked out by hand (scripts/bench/realistic.py: in_process_bytes, choose_arms_mode)."""

from scripts.bench.realistic import choose_arms_mode, in_process_bytes, round_orders

# 100M parameters in float32 (4 bytes), a padded batch of 10,000 positions, 10 layers, hidden 500:
# states 2 sides x 4 copies (weights, gradients, two AdamW moments) x 100e6 x 4 B = 3,200,000,000
# activations 40 values x 10,000 x 10 x 500 x 4 B = 8,000,000,000; libraries 2**30 = 1,073,741,824
NEED = 12_273_741_824


def test_the_in_process_estimate_by_hand():
    """Catches: the states counted once per arm (10 arms: 16e9) or once in all (1.6e9) instead of once per side,
    `sides` ignored (the whole step's three models), the activations left out (4.27e9), bfloat16 sized as
    float32."""
    assert in_process_bytes(100_000_000, 4, 10_000, 10, 500) == NEED
    assert in_process_bytes(100_000_000, 2, 10_000, 10, 500) == (NEED - 2**30) // 2 + 2**30  # bfloat16: half
    # the whole step: ours and two TRL trainers, 3 x 4 x 100e6 x 4 B = 4,800,000,000 of states
    assert in_process_bytes(100_000_000, 4, 10_000, 10, 500, sides=3) == 4_800_000_000 + 8_000_000_000 + 2**30


def test_auto_isolates_the_arms_only_where_the_estimate_exceeds_the_memory():
    """Catches: the comparison reversed, `auto` ignoring the estimate, a forced mode overridden by it."""
    assert choose_arms_mode("auto", NEED, 12_500_000_000)[0] is False  # 12.27e9 fits in 12.5e9
    one, why = choose_arms_mode("auto", NEED, 12_000_000_000)
    assert one is True and "11.4 GiB against 11.2 GiB available exceeds it" in why  # 12.27e9 / 2**30 = 11.43
    assert choose_arms_mode("in-process", NEED, 1)[0] is False
    assert choose_arms_mode("one-at-a-time", NEED, 10**15)[0] is True


def test_smollm2_on_a_machine_with_13_gib_free_runs_its_arms_one_at_a_time():
    """SmolLM2-135M (134,515,008 parameters, 30 layers, hidden 576) on its 32 sampled completions padded to
    44 + 512 = 556 columns: states 2 x 4 x 134,515,008 x 4 B = 4,304,480,256; activations 40 x 32 x 556 x 30 x 576
    x 4 B = 49,191,321,600; with the libraries 54,569,543,680 B = 50.8 GiB, more than 13 GiB."""
    need = in_process_bytes(134_515_008, 4, 32 * 556, 30, 576)
    assert need == 4_304_480_256 + 49_191_321_600 + 2**30
    assert choose_arms_mode("auto", need, 13 * 2**30)[0] is True


def test_each_round_runs_every_arm_once_in_an_order_of_its_own():
    """Catches: one fixed order for every round (an arm's place in the round, which changes its time by up to a
    third on a loaded machine, would bias its median), an arm dropped or repeated in a round, orders that change
    from one run to the next with the same seed."""
    names = [f"arm{i}" for i in range(10)]
    orders = round_orders(names, 6, seed=0)
    assert len(orders) == 6 and all(sorted(order) == sorted(names) for order in orders)
    assert len({tuple(order) for order in orders}) == 6  # 10! orders: six equal ones would be a fixed order
    assert {order[0] for order in orders} != {orders[0][0]}  # not one arm always first
    assert round_orders(names, 6, seed=0) == orders and round_orders(names, 6, seed=1) != orders
