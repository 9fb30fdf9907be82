"""What the tests, the bench and the chaos suite share: the fake OpenAI-compatible model server
(``fake_server``), launchers of the project's real processes (``processes``) and waiting with a
deadline (``polling``). Never imported by the application."""
