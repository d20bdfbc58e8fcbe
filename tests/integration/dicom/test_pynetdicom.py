"""pynetdicom over ISCL in one process: iscl_hsm.dicom.associate (SCU) against start_scp (SCP).

Hospital A runs the SCP, hospital B the SCU, on real SoftHSM2 tokens; the SCP stores with
StorageFolder, as `iscl serve` does. What touches the link (suites, strangers, tampering, a peer's
smaller limit, several links at once) runs in both wire profiles.
"""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from iscl_hsm.dicom import (
    MAXIMUM_PDU_SIZE,
    AssociationRefusedError,
    StorageFolder,
    associate,
    find_files,
    link_of,
    start_scp,
    storage_ae,
    store_files,
)
from iscl_hsm.dicom.storage import OUT_OF_RESOURCES
from iscl_hsm.engine import Closed, Config, Connection, Profile, Role, State
from iscl_hsm.errors import ErrorCode, IsclError
from iscl_hsm.keyholder.pkcs11 import Pkcs11KeyHolder
from iscl_hsm.transport.common import Timeouts
from iscl_hsm.wire import Encryption, Mac, MessageId
from tests.helpers import cfg

from ..conftest import SUITES, Hospitals
from .conftest import assert_stored_exactly, make_study, stored_copy

CHOSEN_SUITES = [p for p in SUITES if p.id in (
    "DES_CBC-DES_MAC-key1", "DES_CBC-MD5-session", "NONE-MD5-key1", "DES_CBC-NONE-session", "NONE-NONE-key1",
)]  # fmt: skip
TIMEOUT = 60.0


class Scp:
    """Hospital A's storage SCP over ISCL on a free loopback port; link failures are collected."""

    def __init__(self, holder: Pkcs11KeyHolder, output: Path, config: Config | None = None) -> None:
        self.output = output
        self.link_errors: list[tuple[str, BaseException]] = []
        self.connections = 0
        self._failed = threading.Event()
        self.server: ThreadedAssociationServer = start_scp(
            storage_ae(), ("127.0.0.1", 0), key_holder=holder, config=config, timeouts=Timeouts(handshake=TIMEOUT),
            evt_handlers=[*StorageFolder(output).evt_handlers, (evt.EVT_CONN_OPEN, self._opened)],
            on_link_error=self._link_error,
        )  # fmt: skip
        self.port: int = self.server.server_address[1]

    def _opened(self, event: Any) -> None:
        self.connections += 1

    def _link_error(self, peer: str, error: BaseException) -> None:
        self.link_errors.append((peer, error))
        self._failed.set()

    def wait_for_link_error(self) -> BaseException:
        assert self._failed.wait(TIMEOUT), "the SCP reported no link failure"
        return self.link_errors[0][1]


@pytest.fixture
def scp(holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, tmp_path: Path) -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def start(config: Config | None = None, output: Path | None = None) -> Scp:
        folder = output or tmp_path / "stored"
        folder.mkdir(exist_ok=True)
        server = Scp(holders(hospitals.a), folder, config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.server.shutdown()


def scu() -> AE:
    ae = AE(ae_title="HOSPITAL-B")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    return ae


@pytest.mark.parametrize(("encryption", "mac", "enc_key_id"), CHOSEN_SUITES)
def test_echo_and_a_study_arrive_unchanged_under_each_suite(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, tmp_path: Path,
    profile: Profile, encryption: Encryption, mac: Mac, enc_key_id: int,
) -> None:  # fmt: skip
    config = cfg(profile, encryption=encryption, mac=mac, enc_key_id=enc_key_id)
    server = scp(config)
    sent = make_study(tmp_path / "study", images=4)
    holder = holders(hospitals.b)

    ae = scu()
    ae.add_requested_context(Verification)
    assoc = associate(ae, "127.0.0.1", server.port, key_holder=holder, config=config)
    link = link_of(assoc)
    assert link is not None and link.parameters is not None
    assert (link.parameters.encryption, link.parameters.mac, link.parameters.enc_key_id) == (
        encryption, mac, enc_key_id,
    )  # fmt: skip
    assert assoc.acceptor.maximum_length == MAXIMUM_PDU_SIZE  # storage_ae() takes PDUs as large as messages
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert link.wait(TIMEOUT) and link.error is None

    files, skipped = find_files([tmp_path / "study"])
    assert skipped == []
    results = store_files(scu(), "127.0.0.1", server.port, files, key_holder=holder, config=config)
    assert [(r.file.path, r.status) for r in results] == [(p, 0x0000) for p in sent]
    assert_stored_exactly(server.output, sent)
    assert server.link_errors == []


def test_each_file_keeps_its_own_transfer_syntax(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, tmp_path: Path
) -> None:
    server = scp()
    sent = make_study(tmp_path / "study", images=3)
    for path, syntax in zip(sent, (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian)):
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)
    files, _ = find_files([tmp_path / "study"])
    assert {f.transfer_syntax for f in files} == {ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                                   ExplicitVRLittleEndian}  # fmt: skip
    results = store_files(scu(), "127.0.0.1", server.port, files, key_holder=holders(hospitals.b))
    assert all(r.ok for r in results), [r.describe() for r in results]
    assert_stored_exactly(server.output, sent)


def test_a_stranger_is_refused_before_pynetdicom_sees_anything(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, profile: Profile
) -> None:
    config = Config(profile=profile)
    server = scp(config)
    ae = scu()
    ae.add_requested_context(Verification)
    with pytest.raises(IsclError) as caught:
        associate(ae, "127.0.0.1", server.port, key_holder=holders(hospitals.stranger), config=config,
                  timeouts=Timeouts(handshake=TIMEOUT))  # fmt: skip
    assert caught.value.code is ErrorCode.AUTHENTICATION_FAILED
    assert "different keys at authentication index 1" in str(caught.value)
    assert isinstance(server.wait_for_link_error(), IsclError)
    assert server.connections == 0  # no association was ever created on the SCP


def test_a_plain_dicom_scp_is_a_clear_timeout(holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals) -> None:
    plain = AE(ae_title="PLAIN")
    plain.add_supported_context(Verification)
    server = plain.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    port = server.server_address[1]
    try:
        ae = scu()
        ae.add_requested_context(Verification)
        with pytest.raises(IsclError) as caught:
            associate(ae, "127.0.0.1", port, key_holder=holders(hospitals.b), timeouts=Timeouts(handshake=2))
    finally:
        server.shutdown()
    assert caught.value.code is ErrorCode.TIMED_OUT
    assert f"no ISCL handshake with 127.0.0.1:{port} within 2 s: is the peer an ISCL endpoint" in str(caught.value)


def test_a_plain_dicom_scu_never_reaches_the_scp(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals
) -> None:
    server = scp()
    plain = scu()
    plain.add_requested_context(Verification)
    assoc = plain.associate("127.0.0.1", server.port)
    assert not assoc.is_established
    error = server.wait_for_link_error()
    assert isinstance(error, IsclError)
    assert server.connections == 0
    # The SCP keeps serving ISCL clients.
    ae = scu()
    ae.add_requested_context(Verification)
    good = associate(ae, "127.0.0.1", server.port, key_holder=holders(hospitals.b))
    assert good.send_c_echo().Status == 0x0000
    good.release()


def test_a_rejected_association_is_named(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals
) -> None:
    server = scp()
    server.server.ae.require_called_aet = True
    ae = scu()
    ae.add_requested_context(Verification)
    with pytest.raises(AssociationRefusedError) as caught:
        associate(ae, "127.0.0.1", server.port, key_holder=holders(hospitals.b), ae_title="NOT-THE-SCP")
    assert str(caught.value).startswith(
        f"the DICOM peer at 127.0.0.1:{server.port} rejected the association (check the AE titles"
    )
    assert server.link_errors == []  # the link itself ended cleanly


def test_nothing_listening_is_named(holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    ae = scu()
    ae.add_requested_context(Verification)
    with pytest.raises(IsclError) as caught:
        associate(ae, "127.0.0.1", port, key_holder=holders(hospitals.b))
    assert str(caught.value).startswith(f"cannot connect to 127.0.0.1:{port}: Connection refused;")


def test_a_write_failure_answers_out_of_resources_and_leaves_nothing(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, tmp_path: Path
) -> None:
    """The output folder is replaced by a regular file after start-up (this fails even for root)."""
    server = scp()
    sent = make_study(tmp_path / "study", images=2)
    shutil.rmtree(server.output)
    server.output.write_bytes(b"")
    files, _ = find_files([tmp_path / "study"])
    results = store_files(scu(), "127.0.0.1", server.port, files, key_holder=holders(hospitals.b))
    assert [r.status for r in results] == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
    assert [r.describe() for r in results] == ["status 0xA700 (Failure)"] * 2
    assert server.output.read_bytes() == b""
    assert not any(stored_copy(tmp_path, p).exists() for p in sent)


def test_the_output_folder_is_checked_at_start_up(tmp_path: Path) -> None:
    from iscl_hsm.dicom import OutputFolderError

    (tmp_path / "file").write_text("")
    for folder, what in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "is not a folder"),
                         (tmp_path / "file" / "sub", "does not exist")):  # fmt: skip
        with pytest.raises(OutputFolderError) as caught:
            StorageFolder(folder)
        assert str(caught.value).startswith(f"the output folder {folder} {what}: create it or choose another")
        assert caught.value.code is ErrorCode.BAD_OPTION


def test_files_that_are_not_dicom_are_reported_and_skipped(tmp_path: Path) -> None:
    sent = make_study(tmp_path / "a" / "b", images=2)
    (tmp_path / "a" / "notes.txt").write_text("not DICOM")
    (tmp_path / "a" / "gone.dcm").symlink_to(tmp_path / "nowhere")
    files, skipped = find_files([tmp_path / "a"])
    assert [f.path for f in files] == sent
    assert [(s.path.name, s.reason) for s in skipped] == [
        ("gone.dcm", "cannot read it: No such file or directory"),
        ("notes.txt", "not a DICOM Part 10 file"),
    ]


def test_a_flipped_byte_aborts_the_association_and_nothing_after_it_is_stored(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, tmp_path: Path,
    mitm: Callable[..., Any], profile: Profile,
) -> None:  # fmt: skip
    """A man in the middle flips one byte in the 6th secured data frame from the SCU (DES-CBC + DES-MAC).

    The same in both profiles: that frame is well past the link's first message (the A-ASSOCIATE-RQ),
    the only one V1.00's DES-CBC + DES-MAC cannot protect (first_message_malleable)."""
    config = Config(profile=profile)
    server = scp(config)
    sent = make_study(tmp_path / "study", images=6)
    data_frames = 0

    def tamper(direction: str, frame: Any) -> bytes:
        nonlocal data_frames
        if direction == "c2s" and frame.message_id == MessageId.MESSAGE_TRANSMISSION_NOTIF:
            data_frames += 1
            if data_frames == 6:
                raw = bytearray(frame.raw)
                raw[40] ^= 0x01  # inside the first encrypted block of the frame
                return bytes(raw)
        return bytes(frame.raw)

    proxy = mitm(server.port, tamper)
    files, _ = find_files([tmp_path / "study"])
    results = store_files(scu(), "127.0.0.1", proxy.port, files, key_holder=holders(hospitals.b), config=config)
    error = server.wait_for_link_error()
    assert isinstance(error, IsclError) and error.code is ErrorCode.BAD_MAC
    stored = [r.file.path for r in results if r.ok]
    assert stored == sent[: len(stored)] and len(stored) < len(sent)  # a prefix, then nothing
    assert all(not r.ok for r in results[len(stored) :])
    assert "the association was aborted" in results[len(stored)].describe()
    assert_stored_exactly(server.output, stored)


def test_an_scp_with_a_smaller_max_message_gets_smaller_messages(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, tmp_path: Path,
    profile: Profile,
) -> None:  # fmt: skip
    """The SCU's bridge learns the SCP's limit from its refusal (PEER_LENGTH_TOO_SMALL) and splits."""
    server = scp(Config(profile=profile, max_message=5000))
    sent = make_study(tmp_path / "study", images=2)
    files, _ = find_files([tmp_path / "study"])
    results = store_files(scu(), "127.0.0.1", server.port, files, key_holder=holders(hospitals.b),
                          config=Config(profile=profile))  # fmt: skip
    assert all(r.ok for r in results), [r.describe() for r in results]
    assert_stored_exactly(server.output, sent)


def test_several_scus_store_at_once(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals, tmp_path: Path,
    profile: Profile,
) -> None:  # fmt: skip
    config = Config(profile=profile)
    server = scp(config)
    holder = holders(hospitals.b)
    studies = [make_study(tmp_path / f"study{n}", images=3) for n in range(3)]
    outcomes: list[list[bool]] = []

    def send(folder: Path) -> None:
        files, _ = find_files([folder])
        results = store_files(scu(), "127.0.0.1", server.port, files, key_holder=holder, config=config)
        outcomes.append([r.ok for r in results])

    threads = [threading.Thread(target=send, args=(tmp_path / f"study{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert outcomes == [[True] * 3] * 3
    assert_stored_exactly(server.output, [path for study in studies for path in study])


def test_a_link_that_comes_up_after_shutdown_starts_no_association(
    scp: Callable[..., Scp], holders: Callable[..., Pkcs11KeyHolder], hospitals: Hospitals
) -> None:
    """`iscl serve` stopped while a link is in its last handshake step: the link comes up after
    shutdown() began. It must start no association (whose DUL thread, not a daemon, would keep the
    process alive for the ACSE timeout), and the client sees the line closed."""
    server = scp()
    server.server.block_on_close = False  # as in `iscl serve`: shutdown() does not wait for the handshake
    conn = Connection(Role.CLIENT, holders(hospitals.b), Config())
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        while conn.state is not State.READY:
            conn.receive_data(sock.recv(1 << 16))
            completion = conn.data_to_send()
            if conn.state is not State.READY:
                sock.sendall(completion)
        server.server.shutdown()
        sock.sendall(completion)  # the server's handshake completes now
        events = []
        while data := sock.recv(1 << 16):
            events += conn.receive_data(data)
            sock.sendall(conn.data_to_send())
    assert any(isinstance(event, Closed) for event in events), events
    assert server.connections == 0
    assert server.server.active_associations == []
