"""What the methods' trainers share: a resumed run's weights restored under the model's names."""
