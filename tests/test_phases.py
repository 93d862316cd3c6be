from inpaint.config import ScheduleConfig
from inpaint.phases import Phase, PhaseSchedule


def test_iteration_boundaries_follow_the_paper_order():
    schedule = PhaseSchedule(ScheduleConfig(generator_steps=3, discriminator_steps=2, joint_steps=4))
    phases = [schedule.phase_at(step, step * 999) for step in range(10)]
    assert phases == [Phase.GENERATOR] * 3 + [Phase.DISCRIMINATOR] * 2 + [Phase.JOINT] * 4 + [Phase.DONE]
    assert schedule.crosses_boundary((2, 0), (3, 0)) and not schedule.crosses_boundary((3, 0), (4, 0))


def test_sample_units_reach_the_same_boundaries_in_fewer_steps_with_more_workers():
    cfg = ScheduleConfig(generator_steps=8, discriminator_steps=4, joint_steps=8, unit="samples", reference_batch=12)
    schedule = PhaseSchedule(cfg)
    assert schedule.boundaries == (96, 144, 240)
    # 4 workers x 12 = 48 samples per step: generator phase ends after 2 steps, not 8.
    assert schedule.phase_at(1, 48) is Phase.GENERATOR
    assert schedule.phase_at(2, 96) is Phase.DISCRIMINATOR
    assert schedule.phase_at(5, 240) is Phase.DONE
    assert schedule.steps_left(0, 0, 48) == 5


def test_empty_phases_are_skipped():
    schedule = PhaseSchedule(ScheduleConfig(generator_steps=0, discriminator_steps=0, joint_steps=2))
    assert schedule.phase_at(0, 0) is Phase.JOINT
    assert Phase.JOINT.trains_generator and Phase.JOINT.trains_discriminator
    assert not Phase.DISCRIMINATOR.trains_generator and not Phase.GENERATOR.trains_discriminator
