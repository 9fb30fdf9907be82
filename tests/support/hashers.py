"""A password hasher for the test process only: PBKDF2 with one iteration.

Django's default takes ~0.26 s of CPU per hash on these machines, and the suite creates and
logs in hundreds of users. The algorithm name is the default's, and the hash string carries its
iteration count, so a worker or API server started by a test (with the default hashers) still
verifies these passwords.
"""

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class OneIterationPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1
