"""Cold start: the signup questionnaire, answer encoding, and the bootstrap regressor
(answers -> initial embedding and bias), after fastai's chapter 8 "bootstrapping" idea."""
